-- wrk script for benches/post_rate.sh: every request is a new build (fresh build_uuid and
-- build_number) whose sources fail at once (SOURCES: a URL on a closed loopback port).
-- Prints one machine-readable line at the end.
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local n = 0
local app_uuid
function init(args)
  math.randomseed(os.time() * 1000 + tid)
  app_uuid = "0b1c2d3e-aaaa-bbbb-cccc-" .. string.format("%012d", tid)
end

local function uuid()
  return (string.gsub("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", "[xy]", function(c)
    local v = (c == "x") and math.random(0, 15) or math.random(8, 11)
    return string.format("%x", v)
  end))
end

local sources = os.getenv("SOURCES") or "http://127.0.0.1:9/gone.tgz"
function request()
  n = n + 1
  local body = string.format(
    '{"app":"bench","space":"default","app_uuid":"%s","build_uuid":"%s","build_number":%d,' ..
    '"sources":"%s","gm_registry_host":"127.0.0.1:5000","gm_registry_repo":"bench"}',
    app_uuid, uuid(), n, sources)
  return wrk.format("POST", "/", { ["Content-Type"] = "application/json" }, body)
end

-- The summary line: the same as GET's (run from the repository's root, as post_rate.sh does).
dofile("benches/get_rate.lua")
