//! Measurement program (not a test): what a registration costs on this device vs a umm hit,
//! and an RDMA WRITE round trip for context. Run in the guest by
//! `scripts/test-rdma.sh --numbers` (release build); needs rxe0 and rxe1.
//!
//! For each size: median `ibv_reg_mr` and `ibv_dereg_mr` over several rounds (on a populated
//! anonymous mapping), and the median cost of a umm hit (`pin` + drop of the cached range).

use std::time::{Duration, Instant};

use umm::{Manager, Range};
use umm_rdma::transport::{connect_pair, Local, Remote};
use umm_rdma::{Access, DeviceSelector, RdmaBackend, RdmaDevice};

/// A populated anonymous mapping and its range.
fn anon(len: usize) -> (memmap2::MmapMut, Range) {
    let map = memmap2::MmapOptions::new()
        .len(len)
        .populate()
        .map_anon()
        .expect("anonymous mapping");
    let range = Range::of_slice(&map[..]).unwrap();
    (map, range)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let open = |n: &str| RdmaDevice::open(&DeviceSelector::Name(n.into()));
    let (rxe0, rxe1) = match (open("rxe0"), open("rxe1")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("rdma-numbers: needs rxe0 and rxe1 ({e})");
            std::process::exit(2);
        }
    };
    let backend = RdmaBackend::new(rxe1.clone(), Access::REMOTE_RW);
    let manager = Manager::default();
    let nic = manager
        .attach(RdmaBackend::new(rxe1.clone(), Access::REMOTE_RW))
        .unwrap();

    println!(
        "ibv_reg_mr + ibv_dereg_mr on {} vs a umm hit (median)",
        rxe1.name()
    );
    println!(
        "{:>8} {:>6} {:>12} {:>12} {:>14} {:>12} {:>12}",
        "size", "rounds", "reg (us)", "dereg (us)", "reg+dereg (us)", "umm hit (ns)", "ratio"
    );
    for shift in [12, 14, 16, 18, 20, 22, 24, 26] {
        let len = 1usize << shift;
        let (_buf, buf) = anon(len);
        let rounds = if len >= 16 << 20 { 5 } else { 21 };
        let (mut reg, mut dereg) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            // SAFETY: `buf` outlives the MR, deregistered right below.
            let mr = unsafe { backend.register_raw(buf) }.unwrap();
            reg.push(t.elapsed());
            let t = Instant::now();
            umm::Backend::deregister(&backend, buf, mr).unwrap();
            dereg.push(t.elapsed());
        }
        let (r, d) = (median(reg), median(dereg));
        drop(manager.pin(buf, &[nic.id()]).unwrap());
        let mut hits = Vec::new();
        for _ in 0..21 {
            let n = 10_000u32;
            let t = Instant::now();
            for _ in 0..n {
                drop(std::hint::black_box(manager.pin(buf, &[nic.id()]).unwrap()));
            }
            hits.push(t.elapsed() / n);
        }
        let hit = median(hits);
        manager.invalidate(buf);
        manager.flush();
        println!(
            "{:>7}K {:>6} {:>12} {:>12} {:>14} {:>12} {:>11.0}x",
            len >> 10,
            rounds,
            us(r),
            us(d),
            us(r + d),
            hit.as_nanos(),
            (r + d).as_secs_f64() / hit.as_secs_f64()
        );
    }

    // RDMA WRITE round trip (post + completion) rxe1 -> rxe0 over the veth.
    let (_src, src) = anon(1 << 20);
    let (_dst, dst) = anon(1 << 20);
    let peer = RdmaBackend::new(rxe0.clone(), Access::REMOTE_RW);
    // SAFETY: the mappings outlive the MRs (dropped at the end of main, before them).
    let (src_mr, dst_mr) = unsafe {
        (
            backend.register_raw(src).unwrap(),
            peer.register_raw(dst).unwrap(),
        )
    };
    let (mut qp, _peer_qp) = connect_pair(&rxe1, &rxe0, 0).unwrap();
    println!("\nRDMA WRITE rxe1 -> rxe0, post to completion (median of 201)");
    for len in [64usize, 4096, 65536, 1 << 20] {
        let mut t_all = Vec::new();
        for _ in 0..201 {
            let t = Instant::now();
            qp.write(
                Local::new(&src_mr, src.start(), len as u32),
                Remote::new(&dst_mr, dst.start()),
            )
            .unwrap();
            t_all.push(t.elapsed());
        }
        let m = median(t_all);
        println!(
            "{:>8} B: {:>9} us  ({:.1} MB/s)",
            len,
            us(m),
            len as f64 / m.as_secs_f64() / 1e6
        );
    }
    drop((src_mr, dst_mr));
}
