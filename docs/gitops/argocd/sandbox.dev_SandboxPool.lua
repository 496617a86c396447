-- Argo CD health of a sandbox.dev SandboxPool: resource.customizations.health.sandbox.dev_SandboxPool
-- (docs/operator.md, "GitOps"). It reads the kstatus conditions the operator writes.
local hs = { status = "Progressing", message = "waiting for the operator to report on the pool" }
local st = obj.status
if st == nil or st.conditions == nil then
  return hs
end
if st.observedGeneration ~= obj.metadata.generation then
  hs.message = "the operator has not reported on generation " .. tostring(obj.metadata.generation) .. " yet"
  return hs
end
for _, condition in ipairs(st.conditions) do
  if condition.status == "True" and condition.type == "Stalled" then
    hs.status = "Degraded"
    hs.message = condition.reason .. ": " .. condition.message
    return hs
  end
end
for _, condition in ipairs(st.conditions) do
  if condition.status == "True" and condition.type == "Reconciling" then
    hs.message = condition.reason .. ": " .. condition.message
    return hs
  end
end
for _, condition in ipairs(st.conditions) do
  if condition.status == "True" and condition.type == "Ready" then
    hs.status = "Healthy"
    hs.message = condition.reason .. ": " .. condition.message
    return hs
  end
end
return hs
