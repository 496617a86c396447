-- Argo CD health of a sandbox.dev Sandbox: resource.customizations.health.sandbox.dev_Sandbox
-- (docs/operator.md, "GitOps"). It reads the kstatus conditions the operator writes.
local hs = { status = "Progressing", message = "waiting for the operator to report on the sandbox" }
local st = obj.status
if st == nil or st.conditions == nil then
  return hs
end
if st.observedGeneration ~= obj.metadata.generation then
  hs.message = "the operator has not reported on generation " .. tostring(obj.metadata.generation) .. " yet"
  return hs
end
local conditions = {}
for _, condition in ipairs(st.conditions) do
  conditions[condition.type] = condition
end
local function holds(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end
local phase = st.phase or "Unknown"
local detail = phase
if st.reason ~= nil then
  detail = detail .. " (" .. st.reason .. ")"
end
if st.message ~= nil and st.message ~= "" then
  detail = detail .. ": " .. st.message
end
hs.message = detail
if holds("Stalled") then
  hs.status = "Degraded"
elseif holds("Reconciling") then
  hs.status = "Progressing"
elseif phase == "Suspended" then
  hs.status = "Suspended"
elseif holds("Ready") or phase == "Terminated" then
  hs.status = "Healthy"
end
return hs
