//! Live counters for other processes: [`Manager::export_stats`] serves a JSON snapshot of
//! [`Manager::stats`] on the abstract Unix socket `\0umm-stats.<pid>`, which `umm stats
//! <pid>` reads (UCX has `ucx_info`, Open MPI `ompi_info`; this is umm's).
//!
//! One connection gets one snapshot, then the socket is closed. The server is a small
//! thread that holds only a `Weak` reference to the manager and reads the counters the way
//! [`Manager::stats`] does (no writer lock), so it never blocks pins or invalidations.
//!
//! The JSON is written by hand (numbers and device names only): the core crate stays free
//! of a serialization dependency for one flat object.
//!
//! ```text
//! {"pid":4242,"invalidations":3,"invalidate_all":0,"partial_hits":1,
//!  "devices":[{"id":0,"name":"rxe0","hits":10,"misses":2,...}]}
//! ```

use std::io::{self, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::manager::Manager;
use crate::stats::Stats;

/// The abstract socket name (without the leading NUL) of process `pid`'s export.
pub fn stats_socket_name(pid: u32) -> String {
    format!("umm-stats.{pid}")
}

/// The export started by [`Manager::export_stats`]; dropping it stops and joins the
/// server thread and frees the socket name.
#[must_use = "dropping the StatsExport stops the export"]
#[derive(Debug)]
pub struct StatsExport {
    stop: Arc<AtomicBool>,
    name: String,
    thread: Option<JoinHandle<()>>,
}

impl StatsExport {
    /// The abstract socket name served (without the leading NUL).
    pub fn socket_name(&self) -> &str {
        &self.name
    }
}

impl Drop for StatsExport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept(): a connection to ourselves; the thread sees `stop` and exits.
        if let Ok(addr) = SocketAddr::from_abstract_name(self.name.as_bytes()) {
            let _ = UnixStream::connect_addr(&addr);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!(socket = %self.name, "stats export thread panicked");
            }
        }
    }
}

impl Manager {
    /// Serves [`Manager::stats`] as JSON on the abstract Unix socket
    /// `\0umm-stats.<pid>` until the returned guard drops (one export per process; a
    /// second fails with `AddrInUse`). Read it with `umm stats <pid>`, or with
    /// [`read_exported_stats`].
    pub fn export_stats(self: &Arc<Self>) -> io::Result<StatsExport> {
        let name = stats_socket_name(std::process::id());
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(self);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("umm-stats-export".into())
            .spawn(move || serve(listener, weak, thread_stop))?;
        tracing::debug!(socket = %name, "stats export started");
        Ok(StatsExport {
            stop,
            name,
            thread: Some(thread),
        })
    }
}

fn serve(listener: UnixListener, manager: Weak<Manager>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "stats export: accept failed");
                continue;
            }
        };
        let body = match manager.upgrade() {
            Some(m) => stats_json(&m.stats()),
            None => "{\"error\":\"the manager was dropped\"}".to_string(),
        };
        // A reader that does not read must not hold the thread (and the guard's drop).
        let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
        if let Err(e) = conn
            .write_all(body.as_bytes())
            .and_then(|_| conn.write_all(b"\n"))
        {
            tracing::debug!(error = %e, "stats export: write failed");
        }
    }
}

/// Connects to process `pid`'s export and returns the JSON snapshot it served.
pub fn read_exported_stats(pid: u32) -> io::Result<String> {
    use std::io::Read;
    let addr = SocketAddr::from_abstract_name(stats_socket_name(pid).as_bytes())?;
    let mut conn = UnixStream::connect_addr(&addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s = String::new();
    conn.read_to_string(&mut s)?;
    Ok(s)
}

fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `stats` as one JSON object (the export's wire format).
pub fn stats_json(stats: &Stats) -> String {
    let mut o = format!(
        "{{\"pid\":{},\"invalidations\":{},\"invalidate_all\":{},\"partial_hits\":{},\"devices\":[",
        std::process::id(),
        stats.invalidations,
        stats.invalidate_all,
        stats.partial_hits
    );
    for (i, d) in stats.devices.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str(&format!("{{\"id\":{},\"name\":", d.id.index()));
        push_str(&mut o, &d.name);
        for (k, v) in [
            ("hits", d.hits),
            ("misses", d.misses),
            ("registrations", d.registrations),
            ("deregistrations", d.deregistrations),
            ("deregistration_errors", d.deregistration_errors),
            ("invalidated_entries", d.invalidated_entries),
            ("evictions", d.evictions),
            ("eviction_scans", d.eviction_scans),
            ("merges", d.merges),
            ("queue_overflows", d.queue_overflows),
            ("registered_bytes", d.registered_bytes),
            ("registered_entries", d.registered_entries),
            ("cached_entries", d.cached_entries),
            ("index_bytes", d.index_bytes),
        ] {
            o.push_str(&format!(",\"{k}\":{v}"));
        }
        o.push('}');
    }
    o.push_str("]}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RecordingBackend;
    use crate::Range;

    #[test]
    fn serves_a_snapshot_per_connection_and_stops_on_drop() {
        let m = Arc::new(Manager::default());
        let nic = m.attach(RecordingBackend::new("n\"ic")).unwrap();
        let buf = vec![0u8; 1 << 16];
        let range = Range::of_slice(&buf).unwrap();
        drop(m.pin(range, &[nic.id()]).unwrap());
        drop(m.pin(range, &[nic.id()]).unwrap());
        let export = m.export_stats().unwrap();
        let pid = std::process::id();
        let first = read_exported_stats(pid).unwrap();
        assert!(first.contains("\"name\":\"n\\\"ic\""), "{first}");
        assert!(first.contains("\"hits\":1,\"misses\":1"), "{first}");
        drop(m.pin(range, &[nic.id()]).unwrap());
        let second = read_exported_stats(pid).unwrap();
        assert!(second.contains("\"hits\":2,"), "a fresh snapshot: {second}");
        // A second export in the same process is refused, typed.
        assert_eq!(
            m.export_stats().unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(export);
        let e = read_exported_stats(pid).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
