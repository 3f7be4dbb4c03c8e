//! The backends of the end-to-end tests: like the echo servers of the
//! Kubernetes docs, each answers with its own name and the client address it
//! saw (`From=<pod> ClientIP=<ip>`), over TCP (a line per line received) and
//! UDP (a datagram per datagram, as large as the request).

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// A backend's answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reply {
    pub from: String,
    pub client_ip: Ipv4Addr,
}

impl Reply {
    fn line(pod: &str, peer: SocketAddr) -> String {
        format!("From={pod} ClientIP={}\n", peer.ip())
    }

    /// Parses `From=<pod> ClientIP=<ip>`.
    pub fn parse(line: &str) -> Result<Self> {
        let mut from = None;
        let mut client_ip = None;
        for field in line.split_whitespace() {
            if let Some(v) = field.strip_prefix("From=") {
                from = Some(v.to_owned());
            } else if let Some(v) = field.strip_prefix("ClientIP=") {
                client_ip = Some(v.parse()?);
            }
        }
        match (from, client_ip) {
            (Some(from), Some(client_ip)) => Ok(Self { from, client_ip }),
            _ => bail!("not an echo reply: {line:?}"),
        }
    }
}

/// Echo servers of one pod, stopped on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    /// Starts TCP and UDP echo servers on `port` in `ns`, answering as `pod`.
    pub fn start(ns: &Netns, pod: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (name, flag, ready) = (pod.to_owned(), stop.clone(), ready_tx.clone());
        ns.spawn(move || serve_tcp(&name, port, &flag, ready))?;
        let (name, flag) = (pod.to_owned(), stop.clone());
        ns.spawn(move || serve_udp(&name, port, &flag, ready_tx))?;
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .context("echo server start")??;
        }
        Ok(Self { stop })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

const POLL: Duration = Duration::from_millis(20);

fn serve_tcp(pod: &str, port: u16, stop: &AtomicBool, ready: std::sync::mpsc::Sender<Result<()>>) {
    let listener = match TcpListener::bind(("0.0.0.0", port)).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    }) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let pod = pod.to_owned();
                std::thread::spawn(move || answer_lines(stream, &pod, peer));
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn answer_lines(stream: TcpStream, pod: &str, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        if line.is_err() || writer.write_all(Reply::line(pod, peer).as_bytes()).is_err() {
            return;
        }
    }
}

fn serve_udp(pod: &str, port: u16, stop: &AtomicBool, ready: std::sync::mpsc::Sender<Result<()>>) {
    let socket = match UdpSocket::bind(("0.0.0.0", port)).and_then(|s| {
        s.set_read_timeout(Some(POLL))?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((len, peer)) = socket.recv_from(&mut buf) {
            // A datagram as large as the request (padded after the line),
            // so that large requests get large (fragmented) replies too.
            let mut reply = Reply::line(pod, peer).into_bytes();
            if len > reply.len() {
                reply.resize(len, b'.');
            }
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// How long a client waits for an answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection kept open across requests.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    /// Connects (from the calling thread's namespace).
    pub fn open(to: SocketAddrV4) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&to.into(), CLIENT_TIMEOUT)
            .with_context(|| format!("connect {to}"))?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// One request, one reply.
    pub fn request(&mut self) -> Result<Reply> {
        self.reader.get_mut().write_all(b"hello\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Reply::parse(&line)
    }
}

/// One request over a fresh TCP connection.
pub fn tcp_request(to: SocketAddrV4) -> Result<Reply> {
    Connection::open(to)?.request()
}

/// One UDP request from a fresh socket (so a fresh source port).
pub fn udp_request(to: SocketAddrV4) -> Result<Reply> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(b"hello", to)?;
    let mut buf = [0u8; 1500];
    let (n, _) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("UDP reply from {to}"))?;
    Reply::parse(&String::from_utf8_lossy(&buf[..n]))
}
