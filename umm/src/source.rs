//! The invalidation side: what tells the manager that a range is going away or changing.

use std::sync::atomic::AtomicU64;

use crate::range::Range;

/// Identifies one [`crate::Manager`] in this process (see [`crate::Manager::id`]); given
/// to [`NotifierSource::attach`] and [`NotifierSource::detach`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManagerId(pub(crate) u32);

impl std::fmt::Display for ManagerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "manager#{}", self.0)
    }
}

/// The error a source returns from [`NotifierSource::watch`] when it cannot see an
/// operation that could replace the pages of `range` (fail safe: a registration it cannot
/// protect must not be made). The manager turns it into [`crate::Error::Uncovered`].
///
/// ```
/// use umm::{source::Uncovered, Range};
/// let range = Range::new(0x10000, 0x1000).unwrap();
/// let e = Uncovered { range, mapping: "a MAP_SHARED shmem mapping", operation: "fallocate(PUNCH_HOLE)" };
/// assert!(e.to_string().contains("fallocate(PUNCH_HOLE)"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{range} is {mapping}; this source cannot see {operation} there")]
pub struct Uncovered {
    /// The range that was to be watched.
    pub range: Range,
    /// What kind of mapping it is ("a MAP_SHARED shmem mapping", "a file mapping", ...).
    pub mapping: &'static str,
    /// The operation the source cannot see ("fallocate(PUNCH_HOLE)", "shmat(SHM_REMAP)"...).
    pub operation: &'static str,
}

/// Where a [`NotifierSource`] delivers what it learned. Implemented by [`crate::Manager`].
///
/// Both methods are allocation-free in their recording step, never wait for a lock that a
/// thread inside `pin` or a backend can hold, and may be called from any thread.
pub trait InvalidationSink: Send + Sync {
    /// `range` was (or is about to be) unmapped, remapped or emptied.
    fn invalidate(&self, range: Range);
    /// Events were lost (a ring overflowed): treat everything as changed.
    fn invalidate_all(&self);
}

/// Something that learns about unmaps/remaps of watched ranges: the kernel module, a
/// userfaultfd reader, interposed `munmap`/`mremap`/`madvise`, or the application itself.
///
/// The manager calls [`watch`](NotifierSource::watch) for every registration before the
/// backend registers it and [`unwatch`](NotifierSource::unwatch) after the backend
/// deregistered it. Cookies are unique per manager; ranges of different cookies may
/// overlap or repeat (one range registered on two devices is watched twice), so a source
/// that maps watches onto a kernel facility must count references per range.
///
/// Sources that learn about events asynchronously (a kernel ring read later) expose a
/// [`generation`](NotifierSource::generation) counter that is bumped synchronously with the
/// causing syscall; every cache hit compares it with the value seen at the last
/// [`drain`](NotifierSource::drain), so a stale entry is never returned after the causing
/// syscall returned. Sources that call [`InvalidationSink`] synchronously (userfaultfd
/// reader, interposition) need no generation.
///
/// # Example
/// ```
/// use std::sync::atomic::AtomicU64;
/// use umm::{InvalidationSink, NotifierSource, Range};
///
/// /// A source that watches nothing and reports nothing.
/// struct Silent;
///
/// impl NotifierSource for Silent {
///     fn name(&self) -> &str { "silent" }
///     fn watch(&self, _cookie: u64, _range: Range)
///         -> Result<(), Box<dyn std::error::Error + Send + Sync>> { Ok(()) }
///     fn unwatch(&self, _cookie: u64, _range: Range) {}
/// }
/// ```
pub trait NotifierSource: Send + Sync {
    /// A short name for logs and errors.
    fn name(&self) -> &str;

    /// Called once by [`crate::Manager::add_source`] before the source is used. A source
    /// that can serve only one manager (its events would otherwise reach only whichever
    /// manager drains first) refuses a second one here; the manager then fails
    /// `add_source` with [`crate::Error::Source`]. The default accepts every manager.
    fn attach(&self, manager: ManagerId) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let _ = manager;
        Ok(())
    }

    /// Called once when the manager the source was attached to is dropped, first thing,
    /// while the manager is still whole: after it returns the source must never call that
    /// manager again (a hook must wait here for its in-flight calls on other threads).
    /// Also called in a fork child's copy of a manager: the source must then touch nothing
    /// it shares with the parent (kernel objects, fds).
    fn detach(&self, manager: ManagerId) {
        let _ = manager;
    }

    /// Start reporting changes of `range` under `cookie`. An error makes the manager undo
    /// the registration and fail the `pin` with [`crate::Error::Watch`].
    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Stop reporting changes of the watch made under `cookie`.
    fn unwatch(&self, cookie: u64, range: Range);

    /// A counter bumped synchronously whenever an event is recorded that
    /// [`drain`](NotifierSource::drain) has not delivered yet, or `None` when the source
    /// delivers every event synchronously. It must live as long as the source.
    fn generation(&self) -> Option<&AtomicU64> {
        None
    }

    /// Delivers every event recorded so far to `sink`. Called by the manager when
    /// [`generation`](NotifierSource::generation) moved; may be called concurrently from
    /// several threads and must not block on anything but the source's own short locks.
    fn drain(&self, sink: &dyn InvalidationSink) {
        let _ = sink;
    }
}

/// What [`crate::Manager::add_source`] accepts: a source by value, in an `Arc`, or already
/// type-erased, so every source crate's constructor plugs in the same way.
pub trait IntoSource {
    /// The source, shared with the manager.
    fn into_source(self) -> std::sync::Arc<dyn NotifierSource>;
}

impl<S: NotifierSource + 'static> IntoSource for S {
    fn into_source(self) -> std::sync::Arc<dyn NotifierSource> {
        std::sync::Arc::new(self)
    }
}

impl<S: NotifierSource + 'static> IntoSource for std::sync::Arc<S> {
    fn into_source(self) -> std::sync::Arc<dyn NotifierSource> {
        self
    }
}

impl IntoSource for std::sync::Arc<dyn NotifierSource> {
    fn into_source(self) -> std::sync::Arc<dyn NotifierSource> {
        self
    }
}
