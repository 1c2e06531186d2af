-- radflag auto-routing for Orthanc: when a study is stable (no new instance for "StableAge"
-- seconds), C-STORE its CR/DX chest series to the "radflag" entry of DicomModalities.
--
-- A series is forwarded again only when it gained instances since it was last forwarded (the
-- count is kept in the series metadata "RadflagForwarded", declared in "UserMetadata"), so the
-- results radflag sends back (SR, modality SR; heatmap SC, modality OT) do not make Orthanc
-- forward the same images again.

local RADFLAG = 'radflag'                   -- the DicomModalities entry of radflag
local MODALITIES = { CR = true, DX = true }
local BODY_PARTS = { [''] = true, CHEST = true, THORAX = true, ['TORSO'] = true }

local function forwardedCount(seriesId)
  local names = ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata'))
  for _, name in ipairs(names) do
    if name == 'RadflagForwarded' then
      return tonumber(RestApiGet('/series/' .. seriesId .. '/metadata/RadflagForwarded')) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local t = series['MainDicomTags']
    local modality = string.upper(t['Modality'] or '')
    local bodyPart = string.upper(t['BodyPartExamined'] or '')
    local count = #series['Instances']
    if MODALITIES[modality] and BODY_PARTS[bodyPart] and count > forwardedCount(series['ID']) then
      print('radflag: forwarding series ' .. series['ID'] .. ' (' .. count .. ' instances)')
      RestApiPost('/modalities/' .. RADFLAG .. '/store',
                  DumpJson({ Resources = { series['ID'] }, Synchronous = true }), true)
      RestApiPut('/series/' .. series['ID'] .. '/metadata/RadflagForwarded', tostring(count), true)
    end
  end
end
