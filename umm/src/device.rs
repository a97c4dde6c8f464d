//! Device identities.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
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

/// Backend names of attached devices, so that a [`DeviceId`] in an error message names
/// the device ("rxe0 (dev#0)"). Written at attach, removed when the manager drops; manager
/// ids are never reused, so a name never describes another device.
static NAMES: RwLock<BTreeMap<(u32, u32), Arc<str>>> = RwLock::new(BTreeMap::new());

pub(crate) fn set_name(id: DeviceId, name: &str) {
    NAMES.write().insert((id.manager, id.index), name.into());
}

pub(crate) fn forget_names(manager: u32) {
    NAMES.write().retain(|(m, _), _| *m != manager);
}

impl DeviceId {
    /// The device's backend name, while its manager lives.
    pub fn name(self) -> Option<Arc<str>> {
        NAMES.read().get(&(self.manager, self.index)).cloned()
    }

    /// The manager the device belongs to.
    pub fn manager(self) -> crate::source::ManagerId {
        crate::source::ManagerId(self.manager)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (dev#{})", self.index),
            None => write!(f, "dev#{}", self.index),
        }
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
