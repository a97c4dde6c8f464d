//! A small live process for `umm stats`: picks the best source, exports its counters,
//! pins, hits, unmaps and re-pins for `SECS` seconds (default 30).
//!
//! `UMM_STATS_EXPORT=1 cargo run -p umm-auto --example live &` then `umm stats <pid>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use umm::{testing::RecordingBackend, Manager, Range};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let manager = Arc::new(Manager::default());
    let choice = umm_auto::add_best_source(&manager)?;
    println!("pid {} source {:?}", std::process::id(), choice.picked);
    let nic = manager.attach(RecordingBackend::new("nic"))?;
    let gpu = manager.attach(RecordingBackend::new("gpu").refusing_overlap())?;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let mut buf = memmap2::MmapMut::map_anon(1 << 20)?;
        buf[0] = 1;
        let range = Range::of_slice(&buf[..])?;
        for _ in 0..100 {
            drop(manager.pin(range, &[nic.id(), gpu.id()])?);
        }
        drop(buf); // munmap: the source invalidates, the next pin registers afresh
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
