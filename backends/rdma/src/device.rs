//! Finding and opening a verbs device, with its one protection domain.

use std::fmt;
use std::io;
use std::sync::Arc;

use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, PortState};
use sideway::ibverbs::protection_domain::ProtectionDomain;

/// Which device to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSelector {
    /// The first device the verbs stack lists.
    First,
    /// A device by its name (`rxe0`, `mlx5_0`).
    Name(String),
    /// A device by its node GUID, as `ibv_devices` prints it (`0x0011_22ff_fe33_4455` for
    /// `001122fffe334455`).
    Guid(u64),
}

impl DeviceSelector {
    /// Parses `"rxe0"` (a name), `"guid:0011:22ff:fe33:4455"` or `"guid:0x001122fffe334455"`.
    pub fn parse(text: &str) -> Result<DeviceSelector, RdmaError> {
        let Some(guid) = text.strip_prefix("guid:") else {
            return Ok(DeviceSelector::Name(text.to_string()));
        };
        let hex: String = guid
            .trim_start_matches("0x")
            .chars()
            .filter(|c| *c != ':')
            .collect();
        u64::from_str_radix(&hex, 16)
            .map(DeviceSelector::Guid)
            .map_err(|_| RdmaError::BadSelector {
                text: text.to_string(),
            })
    }

    fn matches(&self, info: &DeviceInfo) -> bool {
        match self {
            DeviceSelector::First => true,
            DeviceSelector::Name(name) => *name == info.name,
            DeviceSelector::Guid(guid) => *guid == info.guid,
        }
    }
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::First => f.write_str("the first device"),
            DeviceSelector::Name(n) => write!(f, "device {n}"),
            DeviceSelector::Guid(g) => write!(f, "device with GUID {}", guid_text(*g)),
        }
    }
}

fn guid_text(g: u64) -> String {
    format!(
        "{:04x}:{:04x}:{:04x}:{:04x}",
        (g >> 48) & 0xffff,
        (g >> 32) & 0xffff,
        (g >> 16) & 0xffff,
        g & 0xffff
    )
}

/// `ibv_get_device_guid` returns the GUID in network byte order; umm uses the value as
/// `ibv_devices` prints it.
fn host_guid(raw: u64) -> u64 {
    u64::from_be(raw)
}

/// Everything that can go wrong finding, opening or using a device (registration failures
/// are [`crate::RegisterError`], wrapped into the manager's `BackendError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// No verbs stack (`ibv_get_device_list` fails, e.g. `ENOSYS` without RDMA support in
    /// the kernel) or it lists no device at all.
    #[error(
        "no RDMA device: {reason} (load the verbs stack and the NIC's driver: `modprobe \
         ib_uverbs` plus e.g. mlx5_ib; or, without an RDMA NIC, Soft-RoCE: `modprobe rdma_rxe` \
         and `rdma link add rxe0 type rxe netdev <interface>`)"
    )]
    NoDevice {
        /// Why: the OS error of `ibv_get_device_list` or "the device list is empty".
        reason: String,
    },
    /// Devices exist but none matches the selector.
    #[error("{selector} not found (devices: {available:?})")]
    NotFound {
        /// What was asked for.
        selector: DeviceSelector,
        /// The devices that exist.
        available: Vec<String>,
    },
    /// A selector string that is neither a name nor a `guid:` GUID.
    #[error("bad device selector {text:?}")]
    BadSelector {
        /// The text.
        text: String,
    },
    /// A verbs call on a device failed.
    #[error("{device}: {op} failed")]
    Verbs {
        /// The device name.
        device: String,
        /// The verbs call (`ibv_open_device`, `ibv_alloc_pd`, `ibv_modify_qp(RTR)`...).
        op: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A port is not ACTIVE (link down, rxe not bound to an up netdev).
    #[error("{device}: port {port} is {state}, not ACTIVE")]
    PortNotActive {
        /// The device name.
        device: String,
        /// The port number.
        port: u8,
        /// Its state as verbs reports it.
        state: String,
    },
    /// A work request completed with an error status, or not at all in time.
    #[error("{device}: {op} work request {wr_id} {status}")]
    WorkCompletion {
        /// The device name.
        device: String,
        /// `RDMA WRITE` or `RDMA READ`.
        op: &'static str,
        /// The work request id.
        wr_id: u64,
        /// The completion status, or "timed out after ...".
        status: String,
    },
}

impl RdmaError {
    pub(crate) fn verbs(
        device: &str,
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> RdmaError {
        RdmaError::Verbs {
            device: device.to_string(),
            op,
            source: source.into(),
        }
    }
}

/// What [`list_devices`] reports of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device name (`rxe0`).
    pub name: String,
    /// The node GUID as `ibv_devices` prints it.
    pub guid: u64,
}

fn device_list() -> Result<DeviceList, RdmaError> {
    DeviceList::new().map_err(|e| {
        let reason = match e.0 {
            sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io) => io.to_string(),
            other => other.to_string(),
        };
        RdmaError::NoDevice {
            reason: format!("ibv_get_device_list: {reason}"),
        }
    })
}

/// The verbs devices of this machine. Fails with [`RdmaError::NoDevice`] when there is no
/// verbs stack; an empty list is `Ok(vec![])`.
pub fn list_devices() -> Result<Vec<DeviceInfo>, RdmaError> {
    let list = device_list()?;
    let infos = list
        .iter()
        .map(|d| DeviceInfo {
            name: d.name(),
            guid: host_guid(d.guid().as_u64()),
        })
        .collect();
    Ok(infos)
}

/// One opened verbs device and its protection domain. Cheap to share (`Arc`); the
/// protection domain and the device context are freed when the last user (backend, MR,
/// queue pair) drops.
pub struct RdmaDevice {
    name: String,
    guid: u64,
    context: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
}

impl fmt::Debug for RdmaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaDevice")
            .field("name", &self.name)
            .field("guid", &guid_text(self.guid))
            .finish()
    }
}

impl RdmaDevice {
    /// Opens the selected device and allocates its protection domain.
    pub fn open(selector: &DeviceSelector) -> Result<Arc<RdmaDevice>, RdmaError> {
        let list = device_list()?;
        if list.is_empty() {
            return Err(RdmaError::NoDevice {
                reason: "the device list is empty".into(),
            });
        }
        let Some(device) = list.iter().find(|d| {
            selector.matches(&DeviceInfo {
                name: d.name(),
                guid: host_guid(d.guid().as_u64()),
            })
        }) else {
            return Err(RdmaError::NotFound {
                selector: selector.clone(),
                available: list.iter().map(|d| d.name()).collect(),
            });
        };
        let name = device.name();
        let guid = host_guid(device.guid().as_u64());
        let context = device
            .open()
            .map_err(|e| RdmaError::verbs(&name, "ibv_open_device", e))?;
        let pd = context
            .alloc_pd()
            .map_err(|e| RdmaError::verbs(&name, "ibv_alloc_pd", e))?;
        tracing::debug!(device = %name, guid = %guid_text(guid), "opened RDMA device");
        Ok(Arc::new(RdmaDevice {
            name,
            guid,
            context,
            pd,
        }))
    }

    /// The device name (`rxe0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node GUID as `ibv_devices` prints it.
    pub fn guid(&self) -> u64 {
        self.guid
    }

    /// The sideway device context (queries, completion queues).
    pub fn context(&self) -> &Arc<DeviceContext> {
        &self.context
    }

    /// The device's one protection domain: every MR of every [`crate::RdmaBackend`] on this
    /// device and every queue pair of [`crate::transport`] lives in it.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Fails with [`RdmaError::PortNotActive`] unless `port` is ACTIVE.
    pub fn check_port_active(&self, port: u8) -> Result<(), RdmaError> {
        let attr = self
            .context
            .query_port(port)
            .map_err(|e| RdmaError::verbs(&self.name, "ibv_query_port", e))?;
        match attr.port_state() {
            PortState::Active => Ok(()),
            other => Err(RdmaError::PortNotActive {
                device: self.name.clone(),
                port,
                state: format!("{other:?}"),
            }),
        }
    }
}

pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_parsing() {
        assert_eq!(
            DeviceSelector::parse("rxe0").unwrap(),
            DeviceSelector::Name("rxe0".into())
        );
        assert_eq!(
            DeviceSelector::parse("guid:0011:22ff:fe33:4455").unwrap(),
            DeviceSelector::Guid(0x0011_22ff_fe33_4455)
        );
        assert_eq!(
            DeviceSelector::parse("guid:0x10").unwrap(),
            DeviceSelector::Guid(0x10)
        );
        assert!(matches!(
            DeviceSelector::parse("guid:zz"),
            Err(RdmaError::BadSelector { .. })
        ));
    }

    /// On a machine without RDMA (the build host: `ibv_get_device_list` fails with ENOSYS)
    /// opening a device is the typed NoDevice error; where devices exist, an unknown name is
    /// NotFound listing them.
    #[test]
    fn missing_device_is_typed() {
        match RdmaDevice::open(&DeviceSelector::Name("no-such-device".into())) {
            Err(RdmaError::NoDevice { reason }) => {
                eprintln!("no RDMA stack here ({reason}): checked the NoDevice path");
                assert!(matches!(
                    RdmaDevice::open(&DeviceSelector::First),
                    Err(RdmaError::NoDevice { .. })
                ));
            }
            Err(RdmaError::NotFound { available, .. }) => assert!(!available.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
