//! healthCheckNodePort listeners: for every LoadBalancer Service with
//! `externalTrafficPolicy: Local`, HTTP on that port of the node's
//! addresses, answering like kube-proxy — 200 when this node has a local
//! endpoint, 503 otherwise — so the cloud load balancer only sends traffic
//! to nodes that can serve it without a second hop.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use serde_json::json;
use tracing::{info, warn};

use crate::model::HealthCheck;

/// One port's servers (one per node address) and what they report.
struct Listener {
    check: Arc<Mutex<HealthCheck>>,
    servers: Vec<Arc<tiny_http::Server>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for server in &self.servers {
            server.unblock();
        }
    }
}

/// The listeners, kept equal to the Services' health check ports.
#[derive(Default)]
pub struct HealthChecks {
    listeners: BTreeMap<u16, Listener>,
}

impl HealthChecks {
    /// Opens, updates and closes listeners to match `wanted`, on `node_ips`
    /// (every address when none is known).
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>, node_ips: &[Ipv4Addr]) {
        self.listeners.retain(|port, _| wanted.contains_key(port));
        for (port, check) in wanted {
            if let Some(listener) = self.listeners.get(port) {
                *listener.check.lock().unwrap_or_else(|e| e.into_inner()) = check.clone();
                continue;
            }
            let check = Arc::new(Mutex::new(check.clone()));
            let addrs: Vec<IpAddr> = if node_ips.is_empty() {
                vec![Ipv4Addr::UNSPECIFIED.into()]
            } else {
                node_ips.iter().map(|ip| IpAddr::V4(*ip)).collect()
            };
            let mut servers = Vec::new();
            for ip in addrs {
                let addr = SocketAddr::new(ip, *port);
                match serve(addr, check.clone()) {
                    Ok(server) => servers.push(server),
                    Err(err) => warn!(%addr, "health check listener: {err}"),
                }
            }
            info!(port, service = %format!("{}/{}", check_now(&check).namespace, check_now(&check).name), "health check port open");
            self.listeners.insert(*port, Listener { check, servers });
        }
    }
}

fn check_now(check: &Mutex<HealthCheck>) -> HealthCheck {
    check.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn serve(
    addr: SocketAddr,
    check: Arc<Mutex<HealthCheck>>,
) -> Result<Arc<tiny_http::Server>, String> {
    let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| e.to_string())?);
    let serving = server.clone();
    std::thread::Builder::new()
        .name(format!("healthcheck-{addr}"))
        .spawn(move || {
            for request in serving.incoming_requests() {
                let (status, body) = answer(&check_now(&check));
                let header = tiny_http::Header::from_bytes("Content-Type", "application/json")
                    .expect("static header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                let _ = request.respond(response);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(server)
}

/// kube-proxy's answer (pkg/proxy/healthcheck): the Service, how many
/// local endpoints it has, and whether the proxy is healthy.
fn answer(check: &HealthCheck) -> (u16, String) {
    let body = json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if check.local_endpoints > 0 { 200 } else { 503 };
    (status, body.to_string())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn get(port: u16) -> (u16, serde_json::Value) {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1;
        (status, serde_json::from_str(body).unwrap())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn listeners_follow_the_services_and_report_local_endpoints() {
        let port = free_port();
        let mut checks = HealthChecks::default();
        let check = |local_endpoints| HealthCheck {
            namespace: "default".into(),
            name: "lb".into(),
            local_endpoints,
        };
        let loopback = [Ipv4Addr::LOCALHOST];
        checks.sync(&BTreeMap::from([(port, check(2))]), &loopback);
        let (status, body) = get(port);
        assert_eq!(status, 200);
        assert_eq!(body["service"]["name"], "lb");
        assert_eq!(body["localEndpoints"], 2);
        checks.sync(&BTreeMap::from([(port, check(0))]), &loopback);
        assert_eq!(get(port).0, 503);
        checks.sync(&BTreeMap::new(), &loopback);
        // The port is closed (tiny_http stops accepting once unblocked).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(std::time::Instant::now() < deadline, "listener still open");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
