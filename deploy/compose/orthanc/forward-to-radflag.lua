-- Orthanc -> radflag auto-forward (Orthanc Book, "Lua scripting": OnStableStudy, RestApi*).
-- When a study is stable, C-STOREs its CR/DX instances that were not forwarded yet to the
-- "radflag" modality, in one association, and marks them. radflag's SR (modality SR) and
-- SC (modality OT) results are never sent back, so results cannot loop; a late chest image
-- is forwarded at the next stable event.
local CHEST_MODALITIES = { CR = true, DX = true }

local function unsent_chest_instances(studyId)
  local ids = {}
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if CHEST_MODALITIES[series['MainDicomTags']['Modality'] or ''] then
      for _, id in pairs(series['Instances']) do
        local names = ParseJson(RestApiGet('/instances/' .. id .. '/metadata'))
        local sent = false
        for _, name in pairs(names) do
          if name == 'RadflagForwarded' then sent = true end
        end
        if not sent then table.insert(ids, id) end
      end
    end
  end
  return ids
end

function OnStableStudy(studyId, tags, metadata)
  local ids = unsent_chest_instances(studyId)
  if #ids == 0 then return end
  print('radflag: forwarding ' .. #ids .. ' instance(s) of study ' .. studyId)
  RestApiPost('/modalities/radflag/store',
              DumpJson({ Resources = ids, Synchronous = true }, true))
  for _, id in pairs(ids) do
    RestApiPut('/instances/' .. id .. '/metadata/RadflagForwarded', 'yes')
  end
end
