// accept-watch dashboard page.
//
// Charting choice: every chart is plain SVG (and the bars plain DOM) built by this file. No charting
// library and no CDN: the page ships inside the Python package, must work offline and under a strict
// Content-Security-Policy (same-origin scripts, no inline styles), and four simple charts do not need
// a framework. Data arrives as Server-Sent Events from /api/stream (one accept-watch/1 document per
// event, at least once a second); every update redraws from that document alone.
'use strict';

(() => {
  const SVGNS = 'http://www.w3.org/2000/svg';
  const TOP_N = 8; // rate chart: this many workers drawn, the rest summed as "others"
  const DENSE_ROWS = 16; // more workers than this: compact bar rows
  const STALE_MS = 3500; // no update for this long: say so
  const PALETTE = ['#2f6fdf', '#d9480f', '#2e9e5b', '#8e44ad', '#c99a06', '#0f9bb3', '#d6336c', '#5c6bc0'];
  const OTHERS_COLOR = '#b8bdc7';

  const token = new URLSearchParams(location.search).get('token');
  const withToken = (path) =>
    token === null ? path : `${path}${path.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
  const $ = (id) => document.querySelector(`[data-testid="${id}"]`);

  let lastDoc = null;
  let lastMessageAt = 0;
  let updates = 0;
  let sortBy = 'pid';

  // ---- tiny DOM helpers (text always goes through textContent: command lines are untrusted) ----
  function build(node, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'text') node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const el = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const sv = (tag, attrs, ...children) => build(document.createElementNS(SVGNS, tag), attrs, children);
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);

  // ---- formatting ----
  // Any field may be null where unknown (e.g. a queue limit before the first accept): show a dash.
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmtInt = (n) => (isNum(n) ? n.toLocaleString('en-US') : '–');
  const orDash = (v) => (isNum(v) ? v : '–');
  const nearLimit = (q) => isNum(q.max) && isNum(q.limit) && q.limit > 0 && q.max >= q.limit;
  const arr = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v && typeof v === 'object' && !Array.isArray(v) ? v : {});
  // The shapes the sections iterate over, whatever the document left null or out.
  function normalize(raw) {
    const doc = obj(raw);
    doc.workers = arr(doc.workers).filter((w) => w && typeof w === 'object')
      .map((w) => ({ ...w, share: isNum(w.share) ? w.share : 0, queue_wait_us: obj(w.queue_wait_us), rate: obj(w.rate), queue_wait_hist: arr(w.queue_wait_hist) }));
    doc.listeners = arr(doc.listeners).filter((l) => l && typeof l === 'object')
      .map((l) => ({ ...l, queue_depth: obj(l.queue_depth), pids: arr(l.pids), depth_history: arr(l.depth_history) }));
    doc.rate_history = arr(doc.rate_history);
    return doc;
  }
  function fmtPct(fraction) {
    const p = fraction * 100;
    if (p > 0 && p < 0.1) return "<\u00a00.1\u00a0%";
    // Whole percents from 20 % up; one decimal below, so a fair share of 12.5 % reads as such.
    return `${p >= 20 || p === 0 ? p.toFixed(0) : p.toFixed(1)}\u00a0%`;
  }
  function fmtUs(us) {
    if (us === null || us === undefined) return '–';
    if (us < 1) return `${Math.round(us * 1000)} ns`;
    if (us < 1000) return `${us < 10 ? us.toFixed(1) : Math.round(us)} µs`;
    if (us < 1e6) return `${(us / 1000).toFixed(us < 1e4 ? 2 : 1)} ms`;
    return `${(us / 1e6).toFixed(2)} s`;
  }
  function fmtDuration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (x) => String(x).padStart(2, '0');
    if (h) return `${h}h ${pad(m)}m ${pad(s % 60)}s`;
    if (m) return `${m}m ${pad(s % 60)}s`;
    return `${s}s`;
  }
  function fmtRate(r) {
    return r >= 100 ? Math.round(r).toString() : r.toFixed(1);
  }
  function niceCeil(x) {
    if (x <= 0) return 1;
    const p = 10 ** Math.floor(Math.log10(x));
    for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= x) return m * p;
    return 10 * p;
  }

  // ---- sections ----
  function renderHeader(doc) {
    $('master-pid').textContent = String(doc.master_pid);
    $('master-cmdline').textContent = doc.master_cmdline;
    $('master-cmdline').title = doc.master_cmdline;
    // A server in a container: its runtime and short id, the master's pid inside it, the cgroup on hover.
    const master = doc.workers.find((w) => w.pid === doc.master_pid);
    const c = master ? obj(master.container) : {};
    const where = $('master-container');
    where.textContent = c.id ? `${c.runtime} ${String(c.id).slice(0, 12)}` +
      (isNum(master.nspid) ? ` (pid ${master.nspid} inside)` : '') : '';
    where.title = c.id ? `container ${c.id}\ncgroup ${c.cgroup}` : '';
    const probe = $('probe');
    probe.textContent = doc.probe;
    probe.title = `${doc.probe_detail} — kernel ${doc.kernel}`;
    $('elapsed').textContent = fmtDuration(doc.duration_s);
    $('download').href = withToken('/api/snapshot?download=1');
  }

  function renderLoss(doc) {
    const banner = $('loss-banner');
    const lines = [];
    if (doc.unattributed > 0) {
      lines.push(`${fmtInt(doc.unattributed)} accepted connection(s) could not be attributed to a worker: ` +
        'the per-worker counts below are incomplete.');
    }
    if (doc.lost_events > 0) {
      lines.push(`${fmtInt(doc.lost_events)} per-connection event(s) were lost (ring buffer full); ` +
        'per-worker counters remain exact.');
    }
    const exportErrors = obj(doc.export_errors);
    if (exportErrors.count > 0) {
      lines.push(`${fmtInt(exportErrors.count)} export write(s) failed (retried at the next period; counting ` +
        `goes on). Last: ${exportErrors.last_error || '?'}`);
    }
    banner.hidden = lines.length === 0;
    banner.replaceChildren(...lines.map((t) => el('div', { text: t })));
  }

  function setBig(id, value, bad) {
    const node = $(id);
    node.textContent = fmtInt(value);
    node.dataset.value = String(value);
    node.classList.toggle('bad', Boolean(bad));
  }

  // Every verdict and figure is the daemon's analysis (daemon/analysis.py): the page renders it and
  // computes none of its own, so it always says what the terminal, /metrics and `report` say.
  function fromAnalysis(doc) {
    const a = obj(doc.analysis);
    const v = obj(a.verdict);
    const f = obj(a.fairness);
    const c = obj(a.competitors);
    const fig = obj(v.figures);
    const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : null);
    return {
      ideal: num(c.fair_share),
      top: doc.workers.find((w) => w.pid === fig.top_pid) || null,
      ratio: num(f.max_mean_ratio),
      jain: num(f.jain),
      sentence: typeof v.sentence === 'string' ? v.sentence
        : (typeof a.error === 'string' ? a.error : 'No analysis yet.'),
      source: typeof v.sentence === 'string' ? 'analysis' : (typeof a.error === 'string' ? 'error' : 'none'),
      skewed: v.pattern === 'concentrated' || v.pattern === 'single-acceptor',
    };
  }

  function renderTiles(doc, fair) {
    setBig('total', doc.total_accepts, false);
    setBig('lost', doc.lost_events, doc.lost_events > 0);
    setBig('unattributed', doc.unattributed, doc.unattributed > 0);
    const alive = doc.workers.filter((w) => w.alive).length;
    $('workers-count').textContent = `${alive} / ${doc.workers.length}`;
    const sentence = $('fairness');
    sentence.textContent = fair.sentence;
    sentence.dataset.source = fair.source;
    sentence.classList.toggle('skewed', fair.skewed);
    $('fairness-figure').textContent = fair.ratio === null || fair.jain === null ? ''
      : `busiest ${fair.ratio.toFixed(1)}× fair share · Jain index ${fair.jain.toFixed(2)}`;
  }

  function listenerName(l) {
    return l.family === 'ipv6' ? `[${l.address}]:${l.port}` : `${l.address}:${l.port}`;
  }

  function renderListeners(doc) {
    const MAX_CHIPS = 4; // SO_REUSEPORT can mean one listener per worker: the table lists them all
    const chips = doc.listeners.slice(0, MAX_CHIPS).map((l) => {
      const q = l.queue_depth;
      return el('span', {
        class: `chip${nearLimit(q) ? ' full' : ''}`, 'data-testid': 'listener-chip', 'data-port': l.port,
        title: `inode ${l.inode}; held by ${l.pids.length} process(es): ${l.pids.join(', ')}`,
      }, el('b', { text: listenerName(l) }), ' ', el('span', { class: 'mode', text: l.mode }),
      ` · ${fmtInt(l.accepts)} accepts · queue ${orDash(q.current)} now / ${orDash(q.max)} max / ${orDash(q.limit)} limit`);
    });
    if (doc.listeners.length > MAX_CHIPS) {
      chips.push(el('span', { class: 'chip', text: `+${doc.listeners.length - MAX_CHIPS} more (table below)` }));
    }
    if (!doc.listeners.length) chips.push(el('span', { class: 'chip', text: 'no listening socket seen yet' }));
    // How workers wait for connections, and the analysis flags (hidden in-worker queueing, ...).
    const analysis = doc.analysis || {};
    const modes = Object.entries((analysis.wait_modes || {}).counts || {}).filter(([m]) => m !== 'unknown');
    if (modes.length) {
      chips.push(el('span', { class: 'chip', 'data-testid': 'wait-modes',
        text: `workers wait in ${modes.map(([m, c]) => `${m} (${c})`).join(', ')}` }));
    }
    for (const flag of analysis.flags || []) {
      if (flag.code === 'not_enough_data') continue; // already the fairness sentence
      chips.push(el('span', { class: 'chip full', 'data-testid': 'flag', 'data-code': flag.code,
        text: flag.message }));
    }
    $('listeners').replaceChildren(...chips);
  }

  function renderBars(doc, fair) {
    const box = $('worker-bars');
    const workers = [...doc.workers];
    if (sortBy === 'accepts') workers.sort((a, b) => b.accepts - a.accepts || a.pid - b.pid);
    if (!workers.length) {
      box.replaceChildren(el('div', { class: 'empty', text: 'no worker seen yet' }));
      return;
    }
    // Scale to the largest share (or the fair share, so its line stays on screen), not to 100 %:
    // with 64 workers every bar would otherwise be a sliver.
    const full = Math.max(fair.ideal || 0, ...workers.map((w) => w.share), 1e-9) * 1.08;
    const idealLeft = `${((fair.ideal || 0) / full) * 100}%`;
    const rows = workers.map((w) => {
      const fill = el('div', { class: 'bar-fill' });
      fill.style.width = `${(w.share / full) * 100}%`;
      const ideal = el('div', { class: 'bar-ideal', title: `fair share ${fmtPct(fair.ideal || 0)}` });
      ideal.style.left = idealLeft;
      ideal.hidden = fair.ideal === null;
      const classes = ['bar-row'];
      if (!w.alive) classes.push('exited');
      if (fair.skewed && fair.top && fair.top.pid === w.pid) classes.push('busiest');
      return el('div', {
        class: classes.join(' '), 'data-testid': 'worker-row', 'data-pid': w.pid, 'data-accepts': w.accepts,
        'data-alive': w.alive ? 'true' : 'false',
        title: `${w.cmdline}\npid ${w.pid} (ppid ${w.ppid ?? '?'})${w.alive ? '' : ' — exited'}\n` +
          (isNum(w.nspid) ? `pid ${w.nspid} in its container\n` : '') +
          (obj(w.container).id ? `container ${w.container.runtime} ${w.container.id}\n` : '') +
          `${fmtRate(w.rate['10s'])} accepts/s over 10 s`,
        'data-nspid': isNum(w.nspid) ? w.nspid : null,
      },
      el('div', { class: 'bar-pid' },
        w.alive ? null : el('span', { class: 'tag', text: 'exited' }),
        w.role === 'master' ? el('span', { class: 'tag', text: 'master' }) : null,
        String(w.pid),
        isNum(w.nspid) ? el('span', { class: 'ns', 'data-testid': 'worker-nspid', text: ` · ${w.nspid}` }) : null),
      el('div', { class: 'bar-track' }, fill, ideal),
      el('div', { class: 'bar-val', text: `${fmtInt(w.accepts)} · ${fmtPct(w.share)}` }));
    });
    const scroll = box.scrollTop;
    box.classList.toggle('dense', workers.length > DENSE_ROWS);
    box.classList.toggle('with-ns', workers.some((w) => isNum(w.nspid)));
    box.replaceChildren(...rows);
    box.scrollTop = scroll;
  }

  // Seconds without any accept may be absent from rate_history: put zeros back so areas do not
  // interpolate across an idle gap.
  function fillGaps(history) {
    if (history.length < 2) return history;
    let step = Infinity;
    for (let i = 1; i < history.length; i++) {
      const d = history[i][0] - history[i - 1][0];
      if (d > 0) step = Math.min(step, d);
    }
    const out = [history[0]];
    for (let i = 1; i < history.length; i++) {
      const prevT = history[i - 1][0];
      const t = history[i][0];
      if (t - prevT > 1.5 * step) {
        out.push([prevT + step, {}]);
        if (t - step > prevT + step) out.push([t - step, {}]);
      }
      out.push(history[i]);
    }
    return out;
  }

  function chartFrame(container, height, top = 8) {
    const width = Math.max(280, container.clientWidth || 560);
    const m = { l: 44, r: 10, t: top, b: 20 };
    const svg = sv('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img' });
    return { svg, width, height, m, iw: width - m.l - m.r, ih: height - m.t - m.b };
  }

  function timeAxis(f, t0, t1, xOf) {
    const span = t1 - t0;
    const step = span > 600 ? 120 : span > 240 ? 60 : span > 90 ? 30 : span > 30 ? 10 : 5;
    for (let back = 0; t1 - back >= t0; back += step) {
      const x = xOf(t1 - back);
      f.svg.append(sv('line', { class: 'grid-line', x1: x, x2: x, y1: f.m.t, y2: f.m.t + f.ih }));
      f.svg.append(sv('text', { x, y: f.height - 6, 'text-anchor': 'middle', text: back ? `−${fmtDuration(back)}` : 'now' }));
    }
  }

  function valueAxis(f, ymax, yOf, fmt, integer = false) {
    for (const v of [0, integer ? Math.round(ymax / 2) : ymax / 2, ymax]) {
      const y = yOf(v);
      f.svg.append(sv('line', { class: v ? 'grid-line' : 'axis', x1: f.m.l, x2: f.m.l + f.iw, y1: y, y2: y }));
      f.svg.append(sv('text', { x: f.m.l - 4, y: y + 3, 'text-anchor': 'end', text: fmt(v) }));
    }
  }

  function renderRate(doc) {
    const container = $('rate-chart');
    const legend = $('rate-legend');
    const history = fillGaps(doc.rate_history);
    if (history.length < 2) {
      container.replaceChildren(el('div', { class: 'empty', text: 'collecting… (needs two seconds of data)' }));
      legend.replaceChildren();
      $('rate-window').textContent = '';
      return;
    }
    const totals = new Map();
    for (const [, counts] of history) {
      for (const [pid, n] of Object.entries(counts)) totals.set(pid, (totals.get(pid) || 0) + n);
    }
    const ranked = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || Number(a) - Number(b));
    // Top-N by accepts in the window; drawn in pid order so colours stay put while the set is stable.
    const shown = (ranked.length > TOP_N + 1 ? ranked.slice(0, TOP_N) : ranked).sort((a, b) => Number(a) - Number(b));
    const shownSet = new Set(shown);
    const series = shown.map((pid, i) => ({
      label: pid, color: PALETTE[i % PALETTE.length], values: history.map(([, c]) => c[pid] || 0),
    }));
    const othersCount = ranked.length - shown.length;
    if (othersCount > 0) {
      series.push({
        label: `others (${othersCount})`, color: OTHERS_COLOR, others: true,
        values: history.map(([, c]) => sum(Object.entries(c).filter(([p]) => !shownSet.has(p)).map(([, n]) => n))),
      });
    }
    const stackTop = history.map((_, i) => sum(series.map((s) => s.values[i])));
    const f = chartFrame(container, 190);
    const t0 = history[0][0];
    const t1 = history[history.length - 1][0];
    const ymax = niceCeil(Math.max(1, ...stackTop));
    const xOf = (t) => f.m.l + ((t - t0) / (t1 - t0)) * f.iw;
    const yOf = (v) => f.m.t + f.ih - (v / ymax) * f.ih;
    valueAxis(f, ymax, yOf, (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)));
    timeAxis(f, t0, t1, xOf);
    const base = history.map(() => 0);
    for (const s of series) {
      const topPts = history.map(([t], i) => `${xOf(t).toFixed(1)},${yOf(base[i] + s.values[i]).toFixed(1)}`);
      const botPts = history.map(([t], i) => `${xOf(t).toFixed(1)},${yOf(base[i]).toFixed(1)}`).reverse();
      const path = sv('path', { d: `M${topPts.join('L')}L${botPts.join('L')}Z`, fill: s.color, 'fill-opacity': 0.85,
        stroke: '#fff', 'stroke-width': 0.5 },
      sv('title', { text: `${s.others ? s.label : `pid ${s.label}`}: ${fmtInt(sum(s.values))} accepts in window` }));
      f.svg.append(path);
      s.values.forEach((v, i) => { base[i] += v; });
    }
    container.replaceChildren(f.svg);
    const rateOf = new Map(doc.workers.map((w) => [String(w.pid), w.rate['10s']]));
    legend.replaceChildren(...series.map((s) => {
      const sw = el('span', { class: 'sw' });
      sw.style.background = s.color;
      const rate = s.others ? '' : ` ${fmtRate(rateOf.get(s.label) ?? 0)}/s`;
      return el('span', { 'data-testid': 'rate-legend-item' }, sw, s.label, rate);
    }));
    $('rate-window').textContent = `last ${fmtDuration(t1 - t0)}, stacked` +
      (othersCount > 0 ? `, top ${shown.length} + others` : '') + '; legend: 10 s rate';
  }

  // Merged queue-wait histogram of all workers, re-binned on a 1-2-5 grid for readable labels (a
  // source bucket goes to the bin holding its midpoint; source buckets are ≤ 6.25 % wide).
  const WAIT_EDGES_NS = [0];
  for (let decade = 1e2; decade <= 1e10; decade *= 10) WAIT_EDGES_NS.push(decade, 2 * decade, 5 * decade);

  function bucketMid(low, high) {
    return high - low > 1 ? (low + high - 1) / 2 : low;
  }

  function mergedWait(doc) {
    const merged = new Map();
    for (const w of doc.workers) {
      for (const [low, high, count] of w.queue_wait_hist) {
        const key = `${low}:${high}`;
        const entry = merged.get(key) || { low, high, count: 0 };
        entry.count += count;
        merged.set(key, entry);
      }
    }
    const buckets = [...merged.values()].sort((a, b) => a.low - b.low);
    const total = sum(buckets.map((b) => b.count));
    // Nearest rank at the bucket midpoint, as probes/histogram.py's percentile() does.
    const pct = (q) => {
      if (!total) return null;
      const rank = Math.max(1, Math.ceil((total * q) / 100));
      let seen = 0;
      for (const b of buckets) {
        seen += b.count;
        if (seen >= rank) return bucketMid(b.low, b.high) / 1000;
      }
      return null;
    };
    const maxes = doc.workers.map((w) => w.queue_wait_us.max).filter(isNum);
    return { buckets, total, p50: pct(50), p99: pct(99), max: maxes.length ? Math.max(...maxes) : null };
  }

  function binOf(ns) {
    let i = 0;
    while (i + 1 < WAIT_EDGES_NS.length && ns >= WAIT_EDGES_NS[i + 1]) i++;
    return i;
  }

  function renderWait(doc) {
    const m = mergedWait(doc);
    $('wait-summary').replaceChildren(
      'all workers: p50 ', el('b', { 'data-testid': 'wait-p50', text: fmtUs(m.p50) }),
      ' · p99 ', el('b', { 'data-testid': 'wait-p99', text: fmtUs(m.p99) }),
      ' · max ', el('b', { text: fmtUs(m.max) }),
      ` · ${fmtInt(m.total)} samples`);
    const container = $('wait-hist');
    if (!m.total) {
      container.replaceChildren(el('div', { class: 'empty', text: 'no queue-wait sample yet' }));
    } else {
      const counts = new Map();
      for (const b of m.buckets) {
        const i = binOf(bucketMid(b.low, b.high));
        counts.set(i, (counts.get(i) || 0) + b.count);
      }
      const first = Math.min(...counts.keys());
      const last = Math.max(...counts.keys());
      const bins = [];
      for (let i = first; i <= last; i++) bins.push({ i, count: counts.get(i) || 0 });
      const f = chartFrame(container, 140, 16); // room above the plot for the p50/p99 labels
      const ymax = niceCeil(Math.max(...bins.map((b) => b.count)));
      const bw = f.iw / bins.length;
      const yOf = (v) => f.m.t + f.ih - (v / ymax) * f.ih;
      valueAxis(f, ymax, yOf, (v) => fmtInt(Math.round(v)));
      const labelEvery = Math.ceil(bins.length / Math.max(1, Math.floor(f.iw / 46)));
      bins.forEach((b, k) => {
        const x = f.m.l + k * bw;
        const lo = WAIT_EDGES_NS[b.i];
        const hi = WAIT_EDGES_NS[b.i + 1];
        const range = hi === undefined ? `≥ ${fmtUs(lo / 1000)}` : `${fmtUs(lo / 1000)} – ${fmtUs(hi / 1000)}`;
        f.svg.append(sv('rect', { x: x + 1, y: yOf(b.count), width: Math.max(1, bw - 2), height: f.m.t + f.ih - yOf(b.count),
          fill: '#2f6fdf' }, sv('title', { text: `${range}: ${fmtInt(b.count)}` })));
        if (k % labelEvery === 0) {
          f.svg.append(sv('text', { x, y: f.height - 6, 'text-anchor': 'start', text: fmtUs(lo / 1000) }));
        }
      });
      // Percentile markers, placed within their bin on a log scale.
      const xOfUs = (us) => {
        const ns = us * 1000;
        const i = binOf(ns);
        const lo = Math.max(WAIT_EDGES_NS[i], 1);
        const hi = WAIT_EDGES_NS[i + 1] ?? lo * 10;
        const frac = Math.min(1, Math.max(0, Math.log(Math.max(ns, lo) / lo) / Math.log(hi / lo)));
        return f.m.l + (i - first + frac) * bw;
      };
      for (const [label, v, color] of [['p50', m.p50, '#2e9e5b'], ['p99', m.p99, '#c62828']]) {
        const x = xOfUs(v);
        f.svg.append(sv('line', { class: 'marker', x1: x, x2: x, y1: f.m.t, y2: f.m.t + f.ih, stroke: color }));
        f.svg.append(sv('text', { x, y: f.m.t - 4, 'text-anchor': 'middle', text: label, fill: color }));
      }
      container.replaceChildren(f.svg);
    }
    // Per-worker table, worst p99 first.
    const p99s = doc.workers.map((w) => w.queue_wait_us.p99).filter(isNum).sort((a, b) => a - b);
    const medianP99 = p99s.length ? p99s[Math.floor(p99s.length / 2)] : null;
    const rows = [...doc.workers].sort((a, b) =>
      (b.queue_wait_us.p99 ?? -1) - (a.queue_wait_us.p99 ?? -1) || a.pid - b.pid).map((w) => {
      const q = w.queue_wait_us;
      const hot = p99s.length > 1 && q.p99 !== null && q.p99 > 2 * medianP99;
      return el('tr', { class: w.alive ? null : 'exited', 'data-testid': 'wait-row', 'data-pid': w.pid },
        el('td', { text: w.pid }), el('td', { text: fmtInt(w.accepts) }), el('td', { text: fmtUs(q.p50) }),
        el('td', { class: hot ? 'hot' : null, text: fmtUs(q.p99) }), el('td', { text: fmtUs(q.max) }),
        el('td', { text: fmtInt(q.count) }),
        el('td', { class: (w.inflight?.max ?? 0) > 1 ? 'hot' : null, 'data-testid': 'inflight-max',
          text: w.inflight ? fmtInt(w.inflight.max) : '–' }));
    });
    const head = el('tr', {}, ...['pid', 'accepts', 'p50', 'p99', 'max', 'samples', 'in-flight max']
      .map((h) => el('th', { text: h })));
    $('wait-table').replaceChildren(el('thead', {}, head), el('tbody', {}, ...rows));
  }

  function renderDepth(doc) {
    const container = $('depth-chart');
    // The deepest queues first: with SO_REUSEPORT there can be one listener per worker.
    const listeners = [...doc.listeners].sort((a, b) => (b.queue_depth.max || 0) - (a.queue_depth.max || 0) || a.inode - b.inode);
    const drawn = listeners.filter((l) => l.depth_history.length).slice(0, PALETTE.length);
    const color = new Map(drawn.map((l, i) => [l.inode, PALETTE[i]]));
    if (!drawn.length || drawn.every((l) => l.depth_history.length < 2)) {
      container.replaceChildren(el('div', { class: 'empty', text: 'collecting… (needs two samples)' }));
    } else {
      const times = drawn.flatMap((l) => l.depth_history.map(([t]) => t));
      const t0 = Math.min(...times);
      const t1 = Math.max(...times);
      const f = chartFrame(container, 130);
      const ymax = niceCeil(Math.max(1, ...drawn.flatMap((l) => l.depth_history.map(([, d]) => d))));
      const xOf = (t) => f.m.l + (t1 > t0 ? ((t - t0) / (t1 - t0)) * f.iw : f.iw);
      const yOf = (v) => f.m.t + f.ih - (v / ymax) * f.ih;
      valueAxis(f, ymax, yOf, (v) => String(v), true); // queue lengths are whole numbers
      timeAxis(f, t0, t1, xOf);
      for (const l of drawn) {
        const pts = l.depth_history.map(([t, d]) => `${xOf(t).toFixed(1)},${yOf(d).toFixed(1)}`).join(' ');
        f.svg.append(sv('polyline', { points: pts, fill: 'none', stroke: color.get(l.inode), 'stroke-width': 1.5 },
          sv('title', { text: `${listenerName(l)} (inode ${l.inode})` })));
      }
      container.replaceChildren(f.svg);
    }
    const head = el('tr', {}, ...['listener', 'mode', 'procs', 'accepts', 'now', 'max', 'limit'].map((h) => el('th', { text: h })));
    const rows = listeners.map((l) => {
      const sw = el('span', { class: 'sw' });
      if (color.has(l.inode)) sw.style.background = color.get(l.inode);
      const q = l.queue_depth;
      return el('tr', { 'data-testid': 'listener-row', 'data-port': l.port, 'data-inode': l.inode },
        el('td', { class: 'lname' }, sw, listenerName(l)), el('td', { text: l.mode }), el('td', { text: l.pids.length }),
        el('td', { text: fmtInt(l.accepts) }), el('td', { text: orDash(q.current) }),
        el('td', { class: nearLimit(q) ? 'hot' : null, text: orDash(q.max) }), el('td', { text: orDash(q.limit) }));
    });
    $('listener-table').replaceChildren(el('thead', {}, head), el('tbody', {}, ...rows));
  }

  function renderFooter(doc) {
    $('footer').textContent = `updated ${doc.updated_at} · started ${doc.started_at}` +
      (doc.ended_at ? ` · ended ${doc.ended_at}` : '') +
      ` · kernel ${doc.kernel} · accept-watch ${doc.tool_version} · ${doc.schema}`;
  }

  function render(raw) {
    const doc = normalize(raw);
    lastDoc = doc;
    const fair = fromAnalysis(doc);
    const sections = [
      () => renderHeader(doc), () => renderLoss(doc), () => renderTiles(doc, fair), () => renderListeners(doc),
      () => renderBars(doc, fair), () => renderRate(doc), () => renderWait(doc), () => renderDepth(doc),
      () => renderFooter(doc),
    ];
    // One broken section must not blank the others; the error still shows in the console.
    for (const draw of sections) {
      try {
        draw();
      } catch (err) {
        console.error('accept-watch: render failed', err);
      }
    }
  }

  // ---- live updates ----
  function setStatus(kind, text) {
    const node = $('status');
    node.className = `status ${kind}`;
    node.textContent = text;
  }

  function connect() {
    const stream = new EventSource(withToken('/api/stream'));
    stream.addEventListener('snapshot', (event) => {
      lastMessageAt = Date.now();
      const doc = JSON.parse(event.data);
      if (doc.ended_at) setStatus('ended', 'ended');
      else setStatus('live', 'live');
      render(doc);
      updates += 1;
      document.body.dataset.updates = String(updates); // lets tests wait for the next push
    });
    stream.onerror = () => {
      if (stream.readyState === EventSource.CLOSED) {
        // Refused outright (wrong token, server gone): EventSource gives up, so retry ourselves.
        setStatus('down', 'disconnected — retrying');
        stream.close();
        setTimeout(connect, 5000);
      } else {
        setStatus('down', 'reconnecting…');
      }
    };
  }

  setInterval(() => {
    if (lastMessageAt && Date.now() - lastMessageAt > STALE_MS && !(lastDoc && lastDoc.ended_at)) {
      setStatus('wait', `no update for ${Math.round((Date.now() - lastMessageAt) / 1000)} s`);
    }
  }, 1000);

  document.addEventListener('DOMContentLoaded', () => {
    $('download').href = withToken('/api/snapshot?download=1');
    $('sort-toggle').addEventListener('click', (event) => {
      sortBy = sortBy === 'pid' ? 'accepts' : 'pid';
      event.currentTarget.textContent = `sort: ${sortBy}`;
      if (lastDoc) render(lastDoc);
    });
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => lastDoc && render(lastDoc), 150);
    });
    connect();
  });
})();
