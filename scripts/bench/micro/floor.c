// The cost floor of accept-watch's hooks: an empty program on every hook accept-watch attaches in
// tracepoint mode (the same tracepoints, the same raw tracepoint). What this costs a server is the
// price of being called at all: tracepoint dispatch, and every system call of the machine taking the
// syscall-tracing path once a syscall tracepoint is enabled. accept-watch's own work is the rest.
// Loaded by floor.py; the function names are accept-watch's (probes/accept_watch.c), each attached
// to the same tracepoints as there (accept and accept4 share one program).

TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return 0; }
TRACEPOINT_PROBE(sched, sched_process_fork) { return 0; }
TRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }
RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }
