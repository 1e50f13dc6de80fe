-- The floor for `make bench`: what one delivery per request costs Envoy at the least. One asynchronous httpCall
-- per response, with a delivery's header count (5) and about its body size (380 bytes), made by Envoy's Lua filter
-- without reading the request or the response: no matching, no body, no envelope, no signing.
--
-- bench/topology.py replaces the TARGET line below with the load organisation's first webhook.
local TARGET = {} -- @@TARGET@@
local BODY = '{"id":"0000000000000000000000000","data":"' .. string.rep("x", 330) .. '"}'

function envoy_on_response(response_handle)
  response_handle:httpCall(TARGET.cluster, {
    [":method"] = "POST",
    [":path"] = TARGET.path,
    [":authority"] = TARGET.authority,
    ["content-type"] = "application/json",
    ["webhook-id"] = "000000000000000000000000",
  }, BODY, {["asynchronous"] = true, ["timeout_ms"] = 5000})
end
