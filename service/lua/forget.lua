-- celeriac forget, protocol v1 (used by the service's event ingest)
-- KEYS: job hashes whose reports were just applied to SQL. Their tombstones now only need
-- to outlive a reconcile pass that read SQL before the report landed, so they expire
-- soon; a hash without a tombstone was re-published since (a retry, a release): left alone.
for _, job in ipairs(KEYS) do
  if redis.call('HEXISTS', job, 'done') == 1 then redis.call('EXPIRE', job, 30) end
end
return #KEYS
