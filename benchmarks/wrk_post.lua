-- wrk script: POST a body template with unique classification ids (__ID__) and subjects (__SUBJECT__).
-- Env: GZX_BODY (template file), GZX_PATH, GZX_BASE (first id), GZX_PER_BODY (ids per body).
local template = io.open(os.getenv("GZX_BODY")):read("*a")
local path = os.getenv("GZX_PATH")
local base = tonumber(os.getenv("GZX_BASE"))
local per_body = tonumber(os.getenv("GZX_PER_BODY") or "1")
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local first = base + tid * 100000000 + counter * per_body
  local n = -1
  local body = string.gsub(template, "__ID__", function()
    n = n + 1
    return tostring(first + n)
  end)
  body = string.gsub(body, "__SUBJECT__", function() return tostring(counter % 5000) end)
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
