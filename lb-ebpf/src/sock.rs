//! Socket-level load balancing (cgroup v2 hooks): a socket's destination
//! is translated once, when the application names it — `connect()` for TCP
//! and connected UDP, `sendmsg()` for unconnected UDP — so its packets
//! carry the backend's address and need no per-packet translation. The
//! application keeps seeing the Service address: `getpeername()` and
//! `recvmsg()` show it again from the socket reverse map.
//!
//! Frontend lookup and backend choice are the per-packet path's
//! ([`frontend`], [`select`]); only the client differs: a network
//! namespace instead of an address, for affinity.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use lb_common::{
    FrontendKey, PROTO_TCP, PROTO_UDP, Reason, SockRevEntry, SockRevKey, frontend_flags, scope,
};

use crate::{conntrack, frontend, maps::SOCK_REV, select, stats};

/// What a cgroup hook returns: go on with the call, or fail it (with the
/// error set by `bpf_set_retval`, `EPERM` otherwise).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// Errors a refused call returns, as a REJECT or a drop would show them.
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// The network namespace whose sockets alone are balanced (the node's own,
/// `--socket-lb host-only`); 0: every socket. Set by the loader.
#[unsafe(no_mangle)]
static XLB_SOCK_HOST_NETNS: u64 = 0;

/// `connect()` (TCP, connected UDP) or `sendmsg()` (unconnected UDP) to
/// `ctx`'s address: to a backend when it is a frontend's.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel's context, valid for the program's run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let proto = match addr.protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return PROCEED,
    };
    let key = FrontendKey {
        addr: addr.user_ip4,
        port: addr.user_port as u16,
        proto,
        scope: scope::INTERNAL,
    };
    let Some(frontend) = frontend::lookup_key(key) else {
        return PROCEED;
    };
    // Source ranges need the source address, not chosen yet: such
    // frontends are left to the per-packet path.
    if frontend.flags & frontend_flags::SOURCE_RANGES != 0 {
        return PROCEED;
    }
    // SAFETY: a helper taking the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let host_only = host_netns();
    if host_only != 0 && netns != host_only {
        return PROCEED;
    }
    let now = conntrack::now_ns();
    let Some(chosen) = select::select_backend(&frontend, select::ClientNetns(netns), now) else {
        let (reason, error) = if frontend.flags & frontend_flags::DROP_WHEN_EMPTY != 0 {
            (Reason::SockRejectNoLocalBackend, EHOSTUNREACH)
        } else {
            (Reason::SockRejectNoBackend, ECONNREFUSED)
        };
        stats::count(reason, 0);
        // SAFETY: a helper without pointers (these hooks have it from
        // kernel 6.1, below xlb's 6.6).
        unsafe { bpf_set_retval(-error) };
        return REJECT;
    };
    let rev = SockRevKey {
        cookie: socket_cookie(addr),
        backend_addr: chosen.backend.addr,
        backend_port: chosen.backend.port,
        _pad: 0,
    };
    let entry = SockRevEntry {
        frontend_addr: addr.user_ip4,
        frontend_port: addr.user_port as u16,
        _pad: 0,
    };
    // A failed write (never for an LRU map) would only show the backend's
    // address to `getpeername()` / `recvmsg()`.
    let _ = SOCK_REV.insert(rev, entry, 0);
    addr.user_ip4 = chosen.backend.addr;
    addr.user_port = chosen.backend.port as u32;
    stats::count(Reason::SockBalanced, 0);
    PROCEED
}

/// `recvmsg()` / `getpeername()` of a socket: a backend's address it was
/// balanced to is shown as the frontend's.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `forward`.
    let addr = unsafe { &mut *ctx.sock_addr };
    let key = SockRevKey {
        cookie: socket_cookie(addr),
        backend_addr: addr.user_ip4,
        backend_port: addr.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(entry) = unsafe { SOCK_REV.get(key).copied() } {
        addr.user_ip4 = entry.frontend_addr;
        addr.user_port = entry.frontend_port as u32;
        stats::count(Reason::SockRevNat, 0);
    }
    PROCEED
}

/// A socket released: its reverse entry (for the peer it was connected
/// to) goes with it. Entries of an unconnected UDP socket age out of the
/// LRU map.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: the kernel's context, valid for the program's run.
    let sock = unsafe { &*ctx.sock };
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let key = SockRevKey {
        cookie,
        backend_addr: sock.dst_ip4,
        backend_port: sock.dst_port,
        _pad: 0,
    };
    let _ = SOCK_REV.remove(key);
    PROCEED
}

#[inline(always)]
fn socket_cookie(addr: &mut bpf_sock_addr) -> u64 {
    // SAFETY: a helper taking the program's own context.
    unsafe { bpf_get_socket_cookie((addr as *mut bpf_sock_addr).cast()) }
}

#[inline(always)]
fn host_netns() -> u64 {
    // SAFETY: a read-only global the loader fills in; volatile so the
    // compiler does not fold the 0 it was compiled with.
    unsafe { core::ptr::read_volatile(&XLB_SOCK_HOST_NETNS) }
}
