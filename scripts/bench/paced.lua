-- Fixed rate: wrk calls delay() before each request of each connection (with 'Connection: close',
-- after the new connection is established). Argument: the mean delay in milliseconds (a float).
-- wrk takes whole milliseconds, so fractions are carried over from one call to the next.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local interval_ms, carried = nil, 0.0

function init(args)
   interval_ms = tonumber(args[1])
   if interval_ms == nil or interval_ms < 0 then
      error("paced.lua needs the delay in ms as its argument, got " .. tostring(args[1]))
   end
end

function delay()
   carried = carried + interval_ms
   local whole = math.floor(carried)
   carried = carried - whole
   return whole
end
