//! The device side: what a registration domain (RDMA protection domain, CUDA context,
//! Vulkan device) implements to be managed.

use std::any::Any;
use std::fmt;
use std::mem::{align_of, needs_drop, size_of, MaybeUninit};

use crate::range::Range;

/// What a backend can and cannot do; read once when the backend is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether two registrations of this device may overlap. Verbs and Vulkan allow it;
    /// CUDA keys host registrations by address and refuses overlaps, so the manager merges
    /// overlapping requests into one larger registration (adjacent ones stay apart) and deregisters the
    /// old ones first.
    pub allows_overlap: bool,
    /// Registrations are rounded out to this power of two (at least the page size).
    pub alignment: usize,
    /// The largest registration the device accepts, in bytes.
    pub max_registration: usize,
    /// Whether registering memory that is not (entirely) mapped fails in the backend
    /// itself: verbs' `ibv_reg_mr` pins the pages and fails with `EFAULT`, and
    /// `cuMemHostRegister` fails too. The manager then skips its own check before each
    /// registration (one `msync` system call per miss, see [`crate::Config::check_mapped`])
    /// and, when the backend fails on a range that is found unmapped afterwards, still
    /// reports [`crate::Error::Unmapped`]. A device that would accept unmapped memory
    /// (a Vulkan host-pointer import may) leaves it `false`.
    pub rejects_unmapped: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            allows_overlap: true,
            alignment: crate::range::page_size(),
            max_registration: usize::MAX,
            rejects_unmapped: false,
        }
    }
}

/// Coarse classes of backend failures that the manager reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// Out of pinnable memory (`ENOMEM` from RLIMIT_MEMLOCK, a device limit): the manager
    /// evicts the device's unreferenced entries and retries once.
    OutOfMemory,
    /// The range (or part of it) is already registered and the device refuses overlaps.
    AlreadyRegistered,
    /// The device cannot use this memory (unmapped, wrong kind of mapping, misaligned).
    BadAddress,
    /// The device is gone or not usable.
    DeviceUnavailable,
    /// Anything else.
    Other,
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendErrorKind::OutOfMemory => "out of pinnable memory",
            BackendErrorKind::AlreadyRegistered => "already registered",
            BackendErrorKind::BadAddress => "bad address",
            BackendErrorKind::DeviceUnavailable => "device unavailable",
            BackendErrorKind::Other => "backend error",
        })
    }
}

/// A backend's failure: its class plus the backend's own error as the source.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct BackendError {
    /// What kind of failure it is.
    pub kind: BackendErrorKind,
    /// The backend's own error (errno, `CUresult`, `VkResult`, ...).
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    /// Wraps a backend's error.
    pub fn new(
        kind: BackendErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError {
            kind,
            source: source.into(),
        }
    }

    /// Classifies an OS error number (`ENOMEM`, `EFAULT`, ...) and keeps it as the source.
    pub fn from_errno(errno: i32) -> Self {
        let kind = match errno {
            libc::ENOMEM | libc::EAGAIN => BackendErrorKind::OutOfMemory,
            libc::EFAULT | libc::EINVAL => BackendErrorKind::BadAddress,
            libc::EEXIST => BackendErrorKind::AlreadyRegistered,
            libc::ENODEV | libc::ENOSYS | libc::ENXIO => BackendErrorKind::DeviceUnavailable,
            _ => BackendErrorKind::Other,
        };
        BackendError::new(kind, std::io::Error::from_raw_os_error(errno))
    }
}

/// One registration domain: an RDMA protection domain, a CUDA context, a Vulkan device.
///
/// The manager calls a backend only from ordinary threads that may block (a `pin` miss,
/// [`crate::Manager::flush`], eviction, the optional reaper, `Drop`), never from a notifier
/// callback or a signal handler, and never concurrently for overlapping ranges of the same
/// device (all calls for one device are serialised by that device's writer lock).
///
/// # Example
/// ```
/// use umm::{Backend, BackendError, Capabilities, Range};
///
/// /// A "device" whose translation is the address itself.
/// struct Identity;
///
/// impl Backend for Identity {
///     type Translation = usize;
///     fn name(&self) -> &str { "identity" }
///     fn capabilities(&self) -> Capabilities { Capabilities::default() }
///     fn register(&self, range: Range) -> Result<usize, BackendError> { Ok(range.start()) }
///     fn deregister(&self, _range: Range, _t: usize) -> Result<(), BackendError> { Ok(()) }
/// }
/// ```
pub trait Backend: Send + Sync + 'static {
    /// What the device needs to use the memory (lkey/rkey, device pointer, `VkBuffer`...).
    /// It describes the whole registered range; a [`crate::Pin`] adds the offset of the
    /// user's sub-range.
    type Translation: Send + Sync + 'static;

    /// A short name for logs and errors ("rxe0", "cuda:0", "lavapipe").
    fn name(&self) -> &str;

    /// The device's capabilities; read once at attach time.
    fn capabilities(&self) -> Capabilities;

    /// Registers (pins and maps) `range`, which is aligned to
    /// [`Capabilities::alignment`] and no larger than [`Capabilities::max_registration`].
    fn register(&self, range: Range) -> Result<Self::Translation, BackendError>;

    /// Undoes one successful [`Backend::register`] of `range`. Called exactly once per
    /// registration. An error is logged and counted; the registration is forgotten anyway.
    fn deregister(&self, range: Range, translation: Self::Translation) -> Result<(), BackendError>;
}

/// A translation with its type erased, as the manager stores it: a small plain translation
/// (an lkey/rkey pair, a device pointer: at most two words, no destructor) inline, so that
/// reading it on a hit is one load with no pointer chase and no virtual call; any other
/// boxed.
pub(crate) struct ErasedTranslation(Repr);

enum Repr {
    Inline([MaybeUninit<usize>; 2]),
    Boxed(Box<dyn Any + Send + Sync>),
}

/// Whether `T` is stored inline.
const fn inline<T>() -> bool {
    size_of::<T>() <= 2 * size_of::<usize>()
        && align_of::<T>() <= align_of::<usize>()
        && !needs_drop::<T>()
}

impl ErasedTranslation {
    pub(crate) fn new<T: Send + Sync + 'static>(t: T) -> Self {
        if inline::<T>() {
            let mut words = [MaybeUninit::<usize>::uninit(); 2];
            // SAFETY: T fits in two words and needs at most word alignment (checked above).
            unsafe { words.as_mut_ptr().cast::<T>().write(t) };
            ErasedTranslation(Repr::Inline(words))
        } else {
            ErasedTranslation(Repr::Boxed(Box::new(t)))
        }
    }

    /// The translation, if it is a `T` (checked for boxed ones only).
    ///
    /// # Safety
    /// `T` is the type the translation was made from ([`ErasedTranslation::new`]): the
    /// device's backend's translation type, which a typed `Device<B>` guarantees.
    pub(crate) unsafe fn get<T: 'static>(&self) -> Option<&T> {
        match &self.0 {
            // SAFETY: new::<T> wrote a T there (caller's contract).
            Repr::Inline(words) if inline::<T>() => Some(unsafe { &*words.as_ptr().cast::<T>() }),
            Repr::Inline(_) => None,
            Repr::Boxed(b) => b.downcast_ref::<T>(),
        }
    }

    /// The translation by value.
    ///
    /// # Safety
    /// As for [`ErasedTranslation::get`].
    unsafe fn into_inner<T: 'static>(self) -> Option<T> {
        match self.0 {
            Repr::Inline(words) if inline::<T>() => {
                // SAFETY: new::<T> wrote a T there (caller's contract); moved out once.
                Some(unsafe { words.as_ptr().cast::<T>().read() })
            }
            Repr::Inline(_) => None,
            Repr::Boxed(b) => b.downcast::<T>().ok().map(|b| *b),
        }
    }
}

/// Object-safe view of a [`Backend`], so devices of different types share one manager.
pub(crate) trait ErasedBackend: Send + Sync {
    fn as_any(&self) -> &dyn Any;
    fn register(&self, range: Range) -> Result<ErasedTranslation, BackendError>;
    fn deregister(&self, range: Range, translation: ErasedTranslation) -> Result<(), BackendError>;
}

impl<B: Backend> ErasedBackend for B {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn register(&self, range: Range) -> Result<ErasedTranslation, BackendError> {
        Backend::register(self, range).map(ErasedTranslation::new)
    }

    fn deregister(&self, range: Range, translation: ErasedTranslation) -> Result<(), BackendError> {
        // SAFETY: a device only ever stores translations its own backend (B) made.
        match unsafe { translation.into_inner::<B::Translation>() } {
            Some(t) => Backend::deregister(self, range, t),
            // Unreachable by construction (see above).
            None => Err(BackendError::new(
                BackendErrorKind::Other,
                "translation of a foreign type",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translations_round_trip_inline_and_boxed() {
        #[derive(Debug, PartialEq)]
        struct Keys {
            lkey: u32,
            rkey: u32,
            addr: u64,
        }
        let small = ErasedTranslation::new(Keys {
            lkey: 1,
            rkey: 2,
            addr: 3,
        });
        assert!(matches!(small.0, Repr::Inline(_)));
        // SAFETY: made from a Keys just above.
        assert_eq!(unsafe { small.get::<Keys>() }.map(|k| k.rkey), Some(2));
        // SAFETY: as above.
        let back = unsafe { small.into_inner::<Keys>() };
        assert_eq!(
            back,
            Some(Keys {
                lkey: 1,
                rkey: 2,
                addr: 3
            })
        );
        // Three words, or a destructor: boxed, and checked.
        let big = ErasedTranslation::new([7u64; 3]);
        assert!(matches!(big.0, Repr::Boxed(_)));
        // SAFETY: a mismatched boxed type is refused, not reinterpreted.
        assert_eq!(unsafe { big.get::<u8>() }, None);
        let owned = ErasedTranslation::new(String::from("mr"));
        assert!(matches!(owned.0, Repr::Boxed(_)));
        // SAFETY: made from a String just above.
        let owned = unsafe { owned.into_inner::<String>() };
        assert_eq!(owned.as_deref(), Some("mr"));
    }
}
