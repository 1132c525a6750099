//! The Lua scripts behind `RedisStore`: each store step is one script, one round trip.
//!
//! One Redis hash per stored key, `KEYS[1]`:
//!
//! | field | meaning |
//! |---|---|
//! | `v`   | layout version, `1` |
//! | `s`   | state: `f` in flight, `c` completed, `a` abandoned |
//! | `t`   | fencing token of the claim (decimal) |
//! | `fp`  | fingerprint of the claiming request (32 bytes) |
//! | `l`   | lease deadline, Redis server time in ms |
//! | `ttl` | record TTL in ms, kept for an abandoned claim under `Reclaim::Never` |
//! | `r`   | the encoded record (completed only) |
//!
//! Lease deadlines use the Redis server clock (`TIME`), so clients with skewed clocks agree.
//! The completing and releasing scripts `PUBLISH` on a channel named like the key, which wakes
//! waiters on every instance; waiters poll as well, since pub/sub is at-most-once.
//!
//! A key holding something else (another type, an unknown version or state) is reported as
//! corrupt, never overwritten: it may belong to someone else.

use std::sync::LazyLock;

use redis::Script;

/// Shared helpers, prepended to the scripts that need them.
const PRELUDE: &str = r#"
local k = KEYS[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- 'none', 'ours', or an error table for a foreign value
local function inspect()
  local typ = redis.call('TYPE', k)['ok']
  if typ == 'none' then return 'none' end
  if typ ~= 'hash' then return {'e', 'key holds a ' .. typ .. ', not an idempotency record'} end
  if redis.call('HGET', k, 'v') ~= '1' then
    return {'e', 'unknown record layout version'}
  end
  return 'ours'
end
"#;

/// `claim(token, fingerprint, lease_ms, ttl_ms, reclaim)` where `reclaim` is `1` to take over
/// an expired lease and `0` to mark it abandoned.
///
/// Returns `{'a'}` acquired, `{'f', fp, lease_left_ms}` in flight, `{'c', record}` completed,
/// `{'x', fp}` abandoned, `{'e', why}` corrupt.
const CLAIM: &str = r#"
local token, fp, lease, ttl, reclaim = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local function acquire(now)
  redis.call('DEL', k)
  redis.call('HSET', k, 'v', '1', 's', 'f', 't', token, 'fp', fp, 'l', now + lease, 'ttl', ttl)
  redis.call('PEXPIRE', k, lease + ttl)
  return {'a'}
end
local state = inspect()
local now = now_ms()
if state == 'none' then return acquire(now) end
if state ~= 'ours' then return state end
local f = redis.call('HMGET', k, 's', 'fp', 'l', 'ttl', 'r')
local s = f[1]
if s == 'c' then
  if not f[5] then return {'e', 'completed record without a value'} end
  return {'c', f[5]}
end
if s == 'a' then return {'x', f[2] or ''} end
if s ~= 'f' then return {'e', 'unknown record state'} end
local lease_until = tonumber(f[3])
if not lease_until then return {'e', 'claim without a lease deadline'} end
if lease_until > now then return {'f', f[2] or '', lease_until - now} end
-- The lease expired: compare-and-set in this same step, never check-then-set.
if reclaim == '1' then
  acquire(now)
  redis.call('PUBLISH', k, 'r')
  return {'a'}
end
redis.call('HSET', k, 's', 'a')
redis.call('PEXPIRE', k, tonumber(f[4]) or ttl)
redis.call('PUBLISH', k, 'a')
return {'x', f[2] or ''}
"#;

/// The fencing check shared by complete, release and extend: `0` when `ARGV[1]` is not the
/// current claim's token, `-1` when the key holds something foreign.
const FENCE: &str = r#"
local state = inspect()
if state == 'none' then return 0 end
if state ~= 'ours' then return -1 end
local f = redis.call('HMGET', k, 's', 't', 'ttl')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
"#;

/// `complete(token, record, ttl_ms)` → `1`, `0` (claim lost) or `-1` (corrupt).
const COMPLETE: &str = r#"
redis.call('DEL', k)
redis.call('HSET', k, 'v', '1', 's', 'c', 'r', ARGV[2])
redis.call('PEXPIRE', k, ARGV[3])
redis.call('PUBLISH', k, 'c')
return 1
"#;

/// `release(token)` → `1`, `0` (claim lost) or `-1` (corrupt).
const RELEASE: &str = r#"
redis.call('DEL', k)
redis.call('PUBLISH', k, 'r')
return 1
"#;

/// `extend(token, lease_ms)` → `1`, `0` (claim lost) or `-1` (corrupt).
const EXTEND: &str = r#"
local lease = tonumber(ARGV[2])
redis.call('HSET', k, 'l', now_ms() + lease)
redis.call('PEXPIRE', k, lease + (tonumber(f[3]) or 0))
return 1
"#;

/// `peek()` → `{'f', token, lease_left_ms}` while a live claim holds the key, `{'n'}` when the
/// claim may have changed (none, completed, abandoned, lease over), `{'e', why}` corrupt.
/// Read only.
const PEEK: &str = r#"
local state = inspect()
if state == 'none' then return {'n'} end
if state ~= 'ours' then return state end
local f = redis.call('HMGET', k, 's', 't', 'l')
if f[1] ~= 'f' then return {'n'} end
local left = (tonumber(f[3]) or 0) - now_ms()
if left <= 0 then return {'n'} end
return {'f', f[2] or '', left}
"#;

fn script(parts: &[&str]) -> Script {
    Script::new(&parts.concat())
}

pub(super) static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[PRELUDE, CLAIM]));
pub(super) static COMPLETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[PRELUDE, FENCE, COMPLETE]));
pub(super) static RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[PRELUDE, FENCE, RELEASE]));
pub(super) static EXTEND_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[PRELUDE, FENCE, EXTEND]));
pub(super) static PEEK_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[PRELUDE, PEEK]));
