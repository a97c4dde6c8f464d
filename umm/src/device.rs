//! Device identities.

use std::fmt;
use std::marker::PhantomData;

use crate::backend::Backend;

/// A device attached to a [`crate::Manager`]; handed out by [`crate::Manager::attach`].
/// It names its manager too, so an id from another manager is refused, not mistaken for
/// this manager's device of the same index.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DeviceId {
    pub(crate) manager: u32,
    pub(crate) index: u32,
}

impl DeviceId {
    /// The device's index in its manager (0, 1, 2 ... in attach order).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev#{}", self.index)
    }
}

/// A typed handle of an attached device: it knows its backend's translation type, so
/// [`crate::Pin::translation`] returns `&B::Translation` without casts in user code.
pub struct Device<B> {
    pub(crate) id: DeviceId,
    _backend: PhantomData<fn() -> B>,
}

impl<B: Backend> Device<B> {
    pub(crate) fn new(id: DeviceId) -> Self {
        Device {
            id,
            _backend: PhantomData,
        }
    }

    /// The untyped id, for [`crate::Manager::pin`]'s device list.
    pub fn id(&self) -> DeviceId {
        self.id
    }
}

impl<B> Clone for Device<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for Device<B> {}

impl<B> fmt::Debug for Device<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.id)
    }
}

impl<B> From<Device<B>> for DeviceId {
    fn from(d: Device<B>) -> DeviceId {
        d.id
    }
}
