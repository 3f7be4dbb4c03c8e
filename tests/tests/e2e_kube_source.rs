//! End to end with the kube source: an agent whose Services and
//! EndpointSlices come from the API server double (served inside the node's
//! network namespace) balances the scenario's ClusterIP, turns ready after
//! its first complete sync, publishes one Event on a Service it rejects, and
//! keeps serving the last good state through an API outage, catching up
//! once the API is back.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::ensure;
use xlb_tests::{
    api_double::ApiDouble,
    cluster::{Cluster, eventually},
    echo::tcp_request,
    manifests::{Endpoint, Port, documents, endpoint_slice, service},
    require_root,
    scenario::{self, frontend},
};

const LATER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);

/// The scenario's replicas as endpoints.
fn replicas(cluster: &Cluster) -> Vec<Endpoint<'_>> {
    scenario::REPLICAS
        .iter()
        .map(|(name, node)| Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[*node].name))
        .collect()
}

/// A Service the model rejects: its clusterIP is not an address.
fn bad_service() -> String {
    service(
        "broken",
        "10.96.0.99".parse().unwrap(),
        &[Port::tcp("", 80)],
        &["80"],
    )
    .replace("10.96.0.99", "10.96.0.300")
}

#[test]
fn an_agent_on_the_api_serves_reports_and_survives_an_outage() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let listener = cluster.nodes[0]
        .ns
        .enter(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = ApiDouble::serve(listener).unwrap();
    let sample = scenario::manifests(&cluster, &["web-0", "web-1", "web-2"]);
    api.replace_all(&documents(&[sample.clone(), bad_service()]))
        .unwrap();
    let kubeconfig = cluster.manifests().join("../kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
    cluster
        .start_agent_with_source(0, &["--source", "kube", "--kubeconfig", &kubeconfig], &[])
        .unwrap();

    // Served, and ready.
    let client = cluster.pod("client");
    let request = || client.run(|| tcp_request(frontend()));
    eventually("the ClusterIP is served", Duration::from_secs(10), request).unwrap();
    let readyz = SocketAddrV4::new("127.0.0.1".parse().unwrap(), 10256);
    let (status, _) = cluster.http_get(0, readyz, "/readyz").unwrap();
    assert_eq!(status, 200, "ready after the first sync");

    // One Warning Event on the rejected Service, whatever the syncs since.
    eventually(
        "an Event on the bad Service",
        Duration::from_secs(10),
        || {
            let events = api.events();
            ensure!(!events.is_empty(), "no Event yet");
            Ok(())
        },
    )
    .unwrap();
    // Another change makes the agent sync again (a new Service, served);
    // the rejected one stays rejected and gets no second Event.
    let later = documents(&[
        sample.clone(),
        bad_service(),
        service("later", LATER_IP, &[Port::tcp("", 80)], &["80"]),
        endpoint_slice(
            "later",
            "later-1",
            &[Port::tcp("", 80)],
            &replicas(&cluster),
        ),
    ]);
    api.replace_all(&later).unwrap();
    let to_later = SocketAddrV4::new(LATER_IP, 80);
    eventually(
        "the later Service is served",
        Duration::from_secs(10),
        || client.run(|| tcp_request(to_later)),
    )
    .unwrap();
    let events = api.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["regarding"]["kind"], "Service");
    assert_eq!(events[0]["regarding"]["name"], "broken");
    assert_eq!(events[0]["reason"], "InvalidIP");
    assert_eq!(events[0]["type"], "Warning");

    // The API goes away: the datapath keeps serving what it had.
    api.set_down(true);
    eventually(
        "the agent meets the outage",
        Duration::from_secs(10),
        || {
            ensure!(api.refused() >= 3);
            Ok(())
        },
    )
    .unwrap();
    for _ in 0..10 {
        request().unwrap();
    }
    let (status, _) = cluster.http_get(0, readyz, "/readyz").unwrap();
    assert_eq!(status, 200, "still ready: the datapath is complete");
    // Meanwhile the Service is deleted; the agent learns it on return.
    api.replace_all(&bad_service()).unwrap();
    api.set_down(false);
    eventually(
        "the deletion arrives after the outage",
        Duration::from_secs(15),
        || {
            ensure!(request().is_err(), "still served");
            Ok(())
        },
    )
    .unwrap();
}
