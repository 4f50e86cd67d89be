-- Argo CD health check for omni.qwen.ai/OmniDeployment.
-- Install as resource.customizations.health.omni.qwen.ai_OmniDeployment in argocd-cm.
--
--   Degraded     SizingValid=False (the workload does not fit the GPUs: the operator will not
--                roll it out until the spec changes), Stalled=True (it cannot get further without
--                a change: a refused child, failed weights, a missing Secret, a crash loop), or
--                Degraded=True
--   Progressing  the operator has not yet observed the latest spec (status.observedGeneration,
--                or the Ready condition's observedGeneration, is behind metadata.generation),
--                no status yet, Progressing=True (even with Ready=True: a rollout is under way),
--                or Ready not (yet) True
--   Healthy      Ready=True for the current generation and not Progressing
local hs = {}

local function conditionsByType(status)
  local byType = {}
  if status == nil or status.conditions == nil then
    return byType
  end
  for _, c in ipairs(status.conditions) do
    if c.type ~= nil then
      byType[c.type] = c
    end
  end
  return byType
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.message
  if text == nil or text == "" then
    text = c.reason
  end
  if text == nil or text == "" then
    return fallback
  end
  return text
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = conditionsByType(status)
local sizing = conditions["SizingValid"]
local stalled = conditions["Stalled"]
local degraded = conditions["Degraded"]
local progressing = conditions["Progressing"]
local ready = conditions["Ready"]

if sizing ~= nil and sizing.status == "False" then
  hs.status = "Degraded"
  hs.message = "Sizing invalid: " .. describe(sizing, "the workload does not fit the GPU pool")
  return hs
end

-- The same verdict as kstatus' Failed (Flux, kpt, Config Sync).
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "Degraded")
  return hs
end

-- Mid-rollout the old replicas can still be Ready: as in Argo CD's Deployment check, a rollout
-- in progress is Progressing, not Healthy.
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing, "Rolling out")
  return hs
end

-- A condition written for an older generation says nothing about the current spec.
local readyCurrent = ready ~= nil and (generation == nil or ready.observedGeneration == nil
  or ready.observedGeneration >= generation)

if ready ~= nil and ready.status == "True" and readyCurrent then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
if ready ~= nil and not readyCurrent then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
else
  hs.message = describe(ready, "Waiting for the Ready condition")
end
return hs
