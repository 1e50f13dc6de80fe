-- The peer for `make bench`: the webhook-emitter's job done as plainly as a user would with Envoy's own Lua
-- filter (envoy.filters.http.lua, inline code). Match method and path on the request, status on the response,
-- read the whole body, check "status":"completed" with a string find, and POST a JSON envelope to each
-- webhook of the organisation with an asynchronous httpCall. No signing, no retries, no queue, no metrics.
--
-- bench/topology.py replaces the WEBHOOKS line below with the run's webhooks, by organisation id:
--   WEBHOOKS = { ["<org>"] = { {id = "...", cluster = "...", authority = "...", path = "/hooks/..."}, ... } }
local WEBHOOKS = {} -- @@WEBHOOKS@@

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local method = headers:get(":method")
  if method ~= "POST" and method ~= "PUT" and method ~= "PATCH" then
    return
  end
  local path = headers:get(":path") or ""
  if string.match(path, "^/jobs/[^/?]+/complete$") == nil and string.match(path, "^/jobs/[^/?]+/complete%?") == nil then
    return
  end
  local org = headers:get("x-organisation-id")
  if org ~= nil and WEBHOOKS[org] ~= nil then
    request_handle:streamInfo():dynamicMetadata():set("bench.peer", "org", org)
  end
end

function envoy_on_response(response_handle)
  local meta = response_handle:streamInfo():dynamicMetadata():get("bench.peer")
  if meta == nil or response_handle:headers():get(":status") ~= "200" then
    return
  end
  local body = response_handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  if string.find(text, '"status"%s*:%s*"completed"') == nil then
    return
  end
  local org = meta["org"]
  local object = string.gsub(text, "}%s*$", ',"objectType":"job"}', 1)
  local id = string.format("%08x%08x%08x", os.time(), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  local now = os.date("!%Y-%m-%dT%H:%M:%SZ")
  for _, hook in ipairs(WEBHOOKS[org]) do
    local envelope = '{"id":"' .. id .. '","webhookId":"' .. hook.id .. '","organisationId":"' .. org ..
        '","eventType":"job.completed","dateTime":"' .. now .. '","data":{"object":' .. object .. '},"version":1}'
    response_handle:httpCall(hook.cluster, {
      [":method"] = "POST",
      [":path"] = hook.path,
      [":authority"] = hook.authority,
      ["content-type"] = "application/json",
      ["webhook-id"] = id,
    }, envelope, {["asynchronous"] = true, ["timeout_ms"] = 5000})
  end
end
