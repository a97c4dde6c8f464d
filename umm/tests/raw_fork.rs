//! A child made by a raw `fork` system call (no `pthread_atfork` handlers run) must not
//! work with its copy of the parent's manager either: its first miss is refused. Its own
//! test binary, so the child is forked from a process where no other test thread runs.

use umm::testing::RecordingBackend;
use umm::{Config, Error, Manager, Range};

fn fake(page: usize) -> Range {
    Range::new((0x7100_0000 + page) * umm::page_size(), umm::page_size()).unwrap()
}

#[test]
fn a_raw_fork_child_is_refused_at_its_first_miss() {
    let m = Manager::new(Config {
        check_mapped: false,
        ..Config::default()
    });
    let d = RecordingBackend::new("d");
    let ledger = d.ledger();
    let d = m.attach(d).unwrap();
    drop(m.pin(fake(0), &[d.id()]).unwrap());
    // SAFETY: a raw fork from a process with one thread doing anything (the test harness
    // main thread only waits); the child calls the manager and leaves with _exit.
    let pid = unsafe { libc::syscall(libc::SYS_fork) } as libc::pid_t;
    if pid == 0 {
        let refused = matches!(m.pin(fake(1), &[d.id()]), Err(Error::ForkedChild { .. }));
        drop(m); // must not deregister the parent's registrations
        let kept = ledger.live().len() == 1 && ledger.deregistrations() == 0;
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(if refused && kept { 0 } else { 1 }) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    // The parent goes on: a hit, then a miss that registers.
    assert!(m.pin(fake(0), &[d.id()]).unwrap().is_valid());
    assert!(m.pin(fake(1), &[d.id()]).unwrap().is_valid());
}
