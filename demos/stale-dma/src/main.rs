//! `stale-dma`: runs the seed's stale-DMA scenario on Soft-RoCE with a naive cache and
//! with umm (one run per available notifier source) and prints the side-by-side verdict.
//! Exit status: 0 when the naive cache shows the bug and every umm run is correct, 1 when
//! not, 2 when Soft-RoCE is missing (run it through scripts/demo.sh).

// The interposition source's hooks (munmap, mmap(MAP_FIXED), ...) for this binary's code.
umm_interpose::export_hooks!();

use stale_dma::{notifiers, run, verdict_table, DemoError, Mode, Rig, LEN};

fn main() {
    let rig = match Rig::open() {
        Ok(rig) => rig,
        Err(e @ DemoError::NoDevices(_)) => {
            eprintln!("stale-dma: {e}");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("stale-dma: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "stale-DMA on Soft-RoCE: P maps file F1 at B, registers B, RDMA-WRITEs {} KiB rxe1 -> rxe0 (over a veth);\n\
         then unmaps F1, maps F2 at the same B and sends B again.\n",
        LEN >> 10
    );
    let rx_before = stale_dma::peer_veth_rx_bytes();
    let mut outcomes = Vec::new();
    let mut ok = true;
    match run(&rig, &Mode::Naive) {
        Ok(o) => {
            ok &= o.stale();
            outcomes.push(o);
        }
        Err(e) => {
            eprintln!("naive run failed: {e}");
            ok = false;
        }
    }
    for n in notifiers() {
        match run(&rig, &Mode::Umm(&n)) {
            Ok(o) => {
                ok &= o.correct() && matches!(o.stats, Some((1..=2, 2, 1)));
                outcomes.push(o);
            }
            Err(e @ DemoError::Source { .. }) => println!("(skipped umm + {}: {e})", n.name),
            Err(e) => {
                eprintln!("umm + {} failed: {e}", n.name);
                ok = false;
            }
        }
    }
    print!("{}", verdict_table(&outcomes));
    if let Some(o) = outcomes.first() {
        println!(
            "\nB = {:#x}; stats: umm invalidations / registrations / deregistrations.",
            o.addr
        );
    }
    if let (Some(a), Some(b)) = (rx_before, stale_dma::peer_veth_rx_bytes()) {
        println!(
            "veth v1 -> v0 carried {} bytes for {} RDMA WRITEs of {} KiB (the data crossed the wire).",
            b - a,
            2 * outcomes.len(),
            LEN >> 10
        );
    }
    println!(
        "{}",
        if ok {
            "RESULT: the naive cache sent the unmapped file's bytes; umm sent the new ones."
        } else {
            "RESULT: UNEXPECTED (see above)"
        }
    );
    std::process::exit(if ok { 0 } else { 1 });
}
