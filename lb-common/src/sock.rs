//! Socket-level load balancing: what the cgroup programs remember between
//! `connect()` / `sendmsg()` and the calls that must show the Service
//! address again (`recvmsg()`, `getpeername()`).

use crate::map_type;

/// Key of the socket reverse map: a socket (its cookie) and the backend it
/// was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// The backend's address, wire order.
    pub backend_addr: u32,
    /// The backend's port, wire order.
    pub backend_port: u16,
    pub _pad: u16,
}
map_type!(SockRevKey, 16);

/// Value of the socket reverse map: the frontend the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevEntry {
    /// The frontend's address, wire order.
    pub frontend_addr: u32,
    /// The frontend's port, wire order.
    pub frontend_port: u16,
    pub _pad: u16,
}
map_type!(SockRevEntry, 8);

/// Key of the socket affinity map: ClientIP affinity as the socket path
/// keeps it, per client network namespace (the source address is not
/// known at `connect()` time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAffinityKey {
    /// `bpf_get_netns_cookie` of the client's socket.
    pub netns_cookie: u64,
    /// [`crate::Frontend::id`].
    pub frontend_id: u32,
    pub _pad: u32,
}
map_type!(SockAffinityKey, 16);
