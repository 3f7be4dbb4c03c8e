//! A client process for the socket path's end-to-end tests: cgroup hooks
//! act on processes, so the tests run this one inside a node's cgroup and a
//! pod's or the node's network namespace. It talks to the echo servers
//! (`xlb_tests::echo`) and prints one line per request:
//! `ok from=<pod> client=<ip> peer=<ip:port>` — `peer` being what the
//! socket says it talks to (`getpeername`, or a datagram's source) — or
//! `err <errno name>`.
//!
//! ```text
//! xlb-test-client tcp|udp|udp-connected ADDR COUNT   COUNT fresh sockets
//! xlb-test-client tcp-session|udp-session ADDR       one socket, a request
//!                                                    per line on stdin
//! ```

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    process::ExitCode,
};

use xlb_tests::echo::{CLIENT_TIMEOUT, Reply};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("usage: xlb-test-client MODE ADDR [COUNT]");
        return ExitCode::FAILURE;
    };
    let Ok(addr) = addr.parse::<SocketAddrV4>() else {
        eprintln!("not an address: {addr}");
        return ExitCode::FAILURE;
    };
    let count: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
    let mut out = io::stdout().lock();
    match mode.as_str() {
        "tcp" | "udp" | "udp-connected" => {
            for _ in 0..count {
                let result = match mode.as_str() {
                    "tcp" => tcp_connect(addr).and_then(|mut s| tcp_request(&mut s)),
                    "udp" => udp_request(addr),
                    _ => udp_connect(addr).and_then(|s| udp_connected_request(&s)),
                };
                let _ = writeln!(out, "{}", line(result));
            }
        }
        "tcp-session" => match tcp_connect(addr) {
            Ok(mut stream) => session(&mut out, || tcp_request(&mut stream)),
            Err(err) => {
                let _ = writeln!(out, "{}", line(Err(err)));
            }
        },
        "udp-session" => match udp_connect(addr) {
            Ok(socket) => session(&mut out, || udp_connected_request(&socket)),
            Err(err) => {
                let _ = writeln!(out, "{}", line(Err(err)));
            }
        },
        other => {
            eprintln!("unknown mode {other}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// A request per line of standard input, until it closes.
fn session(out: &mut impl Write, mut request: impl FnMut() -> io::Result<(Reply, SocketAddr)>) {
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    for _ in io::stdin().lock().lines().map_while(Result::ok) {
        let _ = writeln!(out, "{}", line(request()));
        let _ = out.flush();
    }
}

fn line(result: io::Result<(Reply, SocketAddr)>) -> String {
    match result {
        Ok((reply, peer)) => format!(
            "ok from={} client={} peer={peer}",
            reply.from, reply.client_ip
        ),
        Err(err) => format!("err {}", errno_name(&err)),
    }
}

fn errno_name(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        _ => format!("{err}").replace(' ', "_"),
    }
}

fn tcp_connect(addr: SocketAddrV4) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    Ok(stream)
}

fn tcp_request(stream: &mut TcpStream) -> io::Result<(Reply, SocketAddr)> {
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    Ok((parse(&line)?, stream.peer_addr()?))
}

fn udp_request(addr: SocketAddrV4) -> io::Result<(Reply, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(b"hello", addr)?;
    let mut buf = [0u8; 1500];
    let (n, source) = socket.recv_from(&mut buf)?;
    Ok((parse(&String::from_utf8_lossy(&buf[..n]))?, source))
}

fn udp_connect(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.connect(addr)?;
    Ok(socket)
}

fn udp_connected_request(socket: &UdpSocket) -> io::Result<(Reply, SocketAddr)> {
    socket.send(b"hello")?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    Ok((
        parse(&String::from_utf8_lossy(&buf[..n]))?,
        socket.peer_addr()?,
    ))
}

fn parse(line: &str) -> io::Result<Reply> {
    Reply::parse(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}
