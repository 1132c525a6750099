//! `MemoryStore` per-operation cost at 10k, 100k and 1M live records, and its memory per record.
//!
//! Three stores are filled with 10,000, 100,000 and 1,000,000 completed records (16-byte body,
//! one `content-type` header, 1 h TTL). Then, for each operation, the three stores are driven
//! in chunks of 256 operations, interleaved, rotating which store goes first, and the result is
//! the ratio of summed times (1M / 10k, 100k / 10k): the cost must stay flat.
//!
//! - `claim`: a claim of a key the store has never seen (the first-execution path). The claims
//!   are released after the chunk, outside the clock, so the store does not grow.
//! - `complete`: storing the outcome of a claim. The same 256 extra keys are claimed (outside
//!   the clock), completed with a zero TTL, and claimed again next chunk, so the store does
//!   not grow either.
//! - `replay`: a claim of a random completed key (the replay path: `Claim::Completed`).
//!
//! Beside each store, in the same chunks, runs its floor: a plain `DashMap` holding the same
//! number of the same records, doing one insert (claim), one in-place replace (complete), or
//! one lookup and `Arc` clone (replay). At 1M random keys every map misses the CPU caches; the
//! floor's own 1M/10k ratio shows how much of the growth is the machine's, not the store's.
//!
//! Memory: a counting global allocator tracks live heap bytes while each store is filled; the
//! delta divided by the record count is the cost of one record. The body and the header map
//! (measured the same way on its own) are subtracted to give the store's own overhead. Sizes
//! are requested sizes: the system allocator's own per-block overhead is not included.
//!
//! Targets (issue 5): cost at 1M within 1.5x of 10k; overhead at most 256 bytes per record.
//!
//! ```text
//! cargo bench --bench store_scaling
//! ```

// A global allocator is an unsafe trait; this bench only counts and forwards to `System`.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
#[path = "support/mod.rs"]
mod support;

use tower_idempotency::{
    Fingerprint, MemoryStore, Record, StoreKey, StoredHeaders, StoredResponse,
    store::{Claim, ClaimRequest, Reclaim, Store, Token},
};

struct Counting;

/// Heap bytes allocated and not yet freed.
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const CHUNK: usize = 256;
const BODY: &[u8; 16] = b"{\"id\":\"ch_1234\"}";
const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(3600);

fn digest(tag: u8, i: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([tag]);
    h.update(i.to_be_bytes());
    h.finalize().into()
}

fn claim_req(fp: Fingerprint) -> ClaimRequest {
    ClaimRequest {
        fingerprint: fp,
        lease: LEASE,
        ttl: TTL,
        reclaim: Reclaim::AfterLease,
    }
}

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h
}

/// A record as the layer keeps it: its own body allocation and header map.
fn record(fp: Fingerprint) -> Arc<Record> {
    Arc::new(Record {
        fingerprint: fp,
        response: Some(StoredResponse {
            status: StatusCode::CREATED,
            headers: headers().into(),
            body: Bytes::copy_from_slice(BODY),
            trailers: None,
        }),
    })
}

fn acquired(c: Claim) -> Token {
    match c {
        Claim::Acquired { token } => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// One store of `n` completed records, and what the operations need.
struct Fixture {
    store: MemoryStore,
    n: usize,
    /// The completed keys, for replays.
    keys: Vec<StoreKey>,
    /// The keys that `complete` cycles through.
    cycle: Vec<StoreKey>,
    fresh: u64,
    rng: u64,
    /// Live heap bytes the fill added, per record.
    bytes_per_record: f64,
    /// The floor: a plain DashMap holding the same keys and records.
    floor: DashMap<StoreKey, Option<Arc<Record>>>,
}

impl Fixture {
    async fn new(n: usize) -> Fixture {
        let store = MemoryStore::new()
            .max_entries(2 * n + 4 * CHUNK)
            .max_bytes(usize::MAX / 2);
        let mut keys = Vec::with_capacity(n);
        let before = LIVE.load(Ordering::Relaxed);
        for i in 0..n as u64 {
            let key = StoreKey(digest(0, i));
            let fp = Fingerprint(digest(1, i));
            let token = acquired(store.claim(key, claim_req(fp)).await.unwrap());
            assert!(store.complete(key, token, record(fp), TTL).await.unwrap());
            keys.push(key); // within capacity: no allocation counted
        }
        let bytes_per_record = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
        assert_eq!(store.len(), n);
        let floor = DashMap::new();
        for (i, key) in keys.iter().enumerate() {
            floor.insert(*key, Some(record(Fingerprint(digest(1, i as u64)))));
        }
        Fixture {
            floor,
            store,
            n,
            keys,
            cycle: (0..CHUNK as u64).map(|i| StoreKey(digest(2, i))).collect(),
            fresh: 0,
            rng: 0x9e37_79b9_7f4a_7c15 ^ n as u64,
            bytes_per_record,
        }
    }

    fn fresh_keys(&mut self) -> Vec<StoreKey> {
        (0..CHUNK)
            .map(|_| {
                self.fresh += 1;
                StoreKey(digest(3, self.fresh))
            })
            .collect()
    }

    fn random_keys(&mut self) -> Vec<StoreKey> {
        (0..CHUNK)
            .map(|_| {
                // xorshift64
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.keys[(self.rng % self.n as u64) as usize]
            })
            .collect()
    }

    /// Floor of `claim`: one insert of a never-seen key (removed outside the clock).
    fn floor_claim(&mut self) -> Duration {
        let keys = self.fresh_keys();
        let start = Instant::now();
        for &key in &keys {
            black_box(self.floor.insert(key, None));
        }
        let t = start.elapsed();
        for key in &keys {
            self.floor.remove(key);
        }
        t
    }

    /// Floor of `complete`: one in-place replacement of a value.
    fn floor_complete(&mut self) -> Duration {
        let recs: Vec<_> = self
            .cycle
            .iter()
            .map(|k| (*k, record(Fingerprint(digest(4, 1)))))
            .collect();
        let start = Instant::now();
        for (key, rec) in recs {
            black_box(self.floor.insert(key, Some(rec)));
        }
        start.elapsed()
    }

    /// Floor of `replay`: one lookup of a random key and a clone of its `Arc`.
    fn floor_replay(&mut self) -> Duration {
        let picks = self.random_keys();
        let start = Instant::now();
        for key in picks {
            black_box(self.floor.get(&key).and_then(|r| r.clone()));
        }
        start.elapsed()
    }

    /// `CHUNK` claims of never-seen keys, released afterwards outside the clock.
    async fn claim(&mut self) -> Duration {
        let keys = self.fresh_keys();
        let fp = Fingerprint(digest(4, 0));
        let mut tokens = Vec::with_capacity(CHUNK);
        let start = Instant::now();
        for &key in &keys {
            tokens.push(self.store.claim(key, claim_req(fp)).await);
        }
        let t = start.elapsed();
        for (key, c) in keys.into_iter().zip(tokens) {
            let token = acquired(c.unwrap());
            assert!(self.store.release(key, token).await.unwrap());
        }
        t
    }

    /// `CHUNK` completes of keys claimed outside the clock.
    async fn complete(&mut self) -> Duration {
        let fp = Fingerprint(digest(4, 1));
        let mut work = Vec::with_capacity(CHUNK);
        for &key in &self.cycle {
            let token = acquired(self.store.claim(key, claim_req(fp)).await.unwrap());
            work.push((key, token, record(fp)));
        }
        let start = Instant::now();
        for (key, token, rec) in work {
            // Zero TTL: the record expires at once and the key is claimed afresh next chunk.
            let ok = self.store.complete(key, token, rec, Duration::ZERO).await;
            black_box(ok.unwrap());
        }
        start.elapsed()
    }

    /// `CHUNK` claims of random completed keys.
    async fn replay(&mut self) -> Duration {
        let picks = self.random_keys();
        let fp = Fingerprint(digest(4, 2));
        let mut replays = 0;
        let start = Instant::now();
        for key in picks {
            let c = self.store.claim(key, claim_req(fp)).await.unwrap();
            replays += matches!(c, Claim::Completed(_)) as usize;
            black_box(c);
        }
        let t = start.elapsed();
        assert_eq!(replays, CHUNK);
        t
    }
}

#[derive(Clone, Copy)]
enum Op {
    Claim,
    Complete,
    Replay,
}

/// Summed time and operations, per fixture: `[store, floor]`.
type Totals = Vec<[(Duration, u64); 2]>;

/// Runs `iters` operations of `op` on every fixture and its floor, interleaved chunk by chunk
/// with a rotating order; adds the times to `totals` and returns the time of the largest store.
fn interleave(
    rt: &Runtime,
    fixtures: &mut [Fixture],
    op: Op,
    iters: u64,
    totals: &mut Totals,
) -> Duration {
    let chunks = iters.div_ceil(CHUNK as u64).max(1) as usize;
    let mut largest = Duration::ZERO;
    let slots = 2 * fixtures.len();
    for round in 0..chunks {
        for k in 0..slots {
            let s = (k + round) % slots;
            let (i, floor) = (s / 2, s % 2 == 1);
            let f = &mut fixtures[i];
            let t = match (op, floor) {
                (Op::Claim, false) => rt.block_on(f.claim()),
                (Op::Complete, false) => rt.block_on(f.complete()),
                (Op::Replay, false) => rt.block_on(f.replay()),
                (Op::Claim, true) => f.floor_claim(),
                (Op::Complete, true) => f.floor_complete(),
                (Op::Replay, true) => f.floor_replay(),
            };
            let slot = &mut totals[i][floor as usize];
            slot.0 += t;
            slot.1 += CHUNK as u64;
            if i == fixtures.len() - 1 && !floor {
                largest += t;
            }
        }
    }
    // Criterion divides by `iters`; the chunks ran `chunks * CHUNK` operations.
    largest.mul_f64(iters as f64 / (chunks * CHUNK) as f64)
}

/// Live heap bytes of the stored headers (`content-type: application/json`).
fn header_map_bytes() -> f64 {
    const N: usize = 10_000;
    let mut v = Vec::with_capacity(N);
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        v.push(StoredHeaders::from(headers()));
    }
    let d = (LIVE.load(Ordering::Relaxed) - before) as f64 / N as f64;
    drop(v);
    d
}

fn main() {
    let mut c = support::criterion(20, Duration::from_millis(300), Duration::from_secs(3));
    let rt = support::current_thread();

    let header_bytes = header_map_bytes();
    let mut fixtures: Vec<Fixture> = SIZES
        .iter()
        .map(|&n| rt.block_on(Fixture::new(n)))
        .collect();

    let mut report = Vec::new();
    for (name, op) in [
        ("claim", Op::Claim),
        ("complete", Op::Complete),
        ("replay", Op::Replay),
    ] {
        let mut totals: Totals = vec![[(Duration::ZERO, 0u64); 2]; fixtures.len()];
        c.bench_function(&format!("memory_store/{name}"), |b| {
            b.iter_custom(|iters| interleave(&rt, &mut fixtures, op, iters, &mut totals))
        });
        if totals[0][0].1 == 0 {
            continue;
        }
        let ns = |i: usize, floor: usize| {
            let (t, n) = totals[i][floor];
            t.as_secs_f64() * 1e9 / n as f64
        };
        report.push(format!(
            "{name:<9} store 1M/10k {:>5.2}  100k/10k {:>5.2}   floor 1M/10k {:>5.2}   store/floor 10k {:>5.2} 1M {:>5.2}   [store {:.0} / {:.0} / {:.0} ns, floor {:.0} / {:.0} / {:.0} ns]",
            ns(2, 0) / ns(0, 0),
            ns(1, 0) / ns(0, 0),
            ns(2, 1) / ns(0, 1),
            ns(0, 0) / ns(0, 1),
            ns(2, 0) / ns(2, 1),
            ns(0, 0),
            ns(1, 0),
            ns(2, 0),
            ns(0, 1),
            ns(1, 1),
            ns(2, 1),
        ));
    }
    for f in &fixtures {
        assert!(
            f.store.len() <= f.n + CHUNK,
            "the store grew during the run"
        );
    }

    println!(
        "\n== MemoryStore cost per operation, ratio to 10k records (same run, interleaved in chunks of {CHUNK}) =="
    );
    for line in &report {
        println!("{line}");
    }
    println!(
        "\n== heap bytes per stored record (body {} B, stored headers {header_bytes:.0} B measured alone; size_of::<Record>() = {} B) ==",
        BODY.len(),
        std::mem::size_of::<Record>(),
    );
    for f in &fixtures {
        let b = f.bytes_per_record;
        println!(
            "{:>9} records  {b:>6.0} B/record  overhead beyond body and stored headers {:>5.0} B  (beyond body and header bytes {:>5.0} B)",
            f.n,
            b - BODY.len() as f64 - header_bytes,
            b - BODY.len() as f64 - ("content-type".len() + "application/json".len()) as f64,
        );
    }
    c.final_summary();
}
