//! End to end: the agent follows the manifests — endpoints removed and added
//! are seen within a second, a deleted Service stops answering and answers
//! again when recreated, and bad input never breaks the other Services.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::ensure;
use xlb_tests::{
    cluster::eventually,
    echo::tcp_request,
    manifests::{Endpoint, Port, documents, endpoint_slice, service},
    require_root,
    scenario::{self, frontend},
};

const WITHIN: Duration = Duration::from_secs(1);

/// The set of backends that answer `n` fresh connections from `client`.
fn answering(cluster: &xlb_tests::cluster::Cluster, n: usize) -> anyhow::Result<BTreeSet<String>> {
    cluster.pod("client").run(|| {
        (0..n)
            .map(|_| tcp_request(frontend()).map(|r| r.from))
            .collect()
    })
}

#[test]
fn endpoint_removal_and_addition_are_seen_within_a_second() {
    require_root!();
    let mut cluster = scenario::running().unwrap();
    // web-2 goes away (its slice entry first, as with a real rollout).
    let started = Instant::now();
    cluster
        .write_manifest(
            "sample.yaml",
            &scenario::manifests(&cluster, &["web-0", "web-1"]),
        )
        .unwrap();
    cluster.pod_mut("web-2").stop_serving();
    eventually("web-2 no longer chosen", WITHIN, || {
        let backends = answering(&cluster, 12)?;
        ensure!(
            backends == BTreeSet::from(["web-0".into(), "web-1".into()]),
            "{backends:?}"
        );
        Ok(())
    })
    .unwrap();
    eprintln!("removal seen after {:?}", started.elapsed());
    // web-2 back (a new pod with the same name on node2).
    let mut cluster = cluster;
    cluster
        .add_pod(1, "web-3", &[scenario::TARGET_PORT])
        .unwrap();
    let mut yaml = scenario::manifests(&cluster, &["web-0", "web-1"]);
    yaml.push_str(&format!(
        "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: node2\n",
        cluster.pod("web-3").ip
    ));
    // The new pod's veth appeared after the agents started: they attach it.
    eventually("agent attached the new pod", WITHIN * 2, || {
        ensure!(cluster.bpffs(1).join("links/ingress_veth2").exists());
        Ok(())
    })
    .unwrap();
    let started = Instant::now();
    cluster.write_manifest("sample.yaml", &yaml).unwrap();
    eventually("web-3 chosen", WITHIN, || {
        let backends = answering(&cluster, 20)?;
        ensure!(backends.contains("web-3"), "{backends:?}");
        Ok(())
    })
    .unwrap();
    eprintln!("addition seen after {:?}", started.elapsed());
}

#[test]
fn deleted_service_stops_answering_and_recreated_answers_again() {
    require_root!();
    let cluster = scenario::running().unwrap();
    let all = scenario::manifests(&cluster, &["web-0", "web-1", "web-2"]);
    cluster.remove_manifest("sample.yaml").unwrap();
    eventually("service gone", WITHIN, || {
        let result = cluster.pod("client").run(|| tcp_request(frontend()));
        ensure!(result.is_err(), "still answered: {result:?}");
        Ok(())
    })
    .unwrap();
    cluster.write_manifest("sample.yaml", &all).unwrap();
    eventually("service back", WITHIN, || {
        cluster.pod("client").run(|| tcp_request(frontend()))?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn bad_input_is_skipped_counted_and_never_breaks_other_services() {
    require_root!();
    let cluster = scenario::running().unwrap();
    let bad = documents(&[
        service("bad-ip", "10.96.0.11".parse().unwrap(), &[Port::tcp("", 80)], &["80"])
            .replace("10.96.0.11", "10.96.0.999"),
        service("bad-port", "10.96.0.12".parse().unwrap(), &[Port::tcp("", 80)], &["80"])
            .replace("port: 80", "port: 99999"),
        service("bad-proto", "10.96.0.13".parse().unwrap(), &[Port::tcp("", 80)], &["80"])
            .replace("protocol: TCP", "protocol: FTP"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: sample-clusterip}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [nope]}]\n".into(),
        "kind: Service\n  spec: [broken\n".into(),
    ]);
    cluster.write_manifest("bad.yaml", &bad).unwrap();
    let metrics = "127.0.0.1:10249".parse().unwrap();
    let text = eventually("invalid objects counted", Duration::from_secs(2), || {
        let (_, text) = cluster.http_get(0, metrics, "/metrics")?;
        let count: u64 = text
            .lines()
            .filter(|l| l.starts_with("xlb_invalid_objects_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        ensure!(count >= 5, "{count} counted\n{text}");
        Ok(text)
    })
    .unwrap();
    for reason in ["invalid_ip", "invalid_port", "unknown_protocol", "parse"] {
        assert!(
            text.contains(&format!("reason=\"{reason}\"")),
            "{reason} in\n{text}"
        );
    }
    // The good Service still spreads over every backend; the agent is healthy.
    let backends = answering(&cluster, 30).unwrap();
    assert_eq!(backends.len(), 3, "{backends:?}");
    // The datapath's counters by reason, and the sync metrics, are exported
    // (2 frontends, TCP and UDP; 3 backends each, ids per protocol).
    let (_, text) = cluster.http_get(0, metrics, "/metrics").unwrap();
    let forwarded = text
        .lines()
        .find(|l| l.starts_with("xlb_datapath_packets_total{reason=\"forward_new\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(
        forwarded.is_some_and(|n| n >= 30),
        "datapath counters in\n{text}"
    );
    for family in [
        "xlb_sync_duration_seconds_bucket",
        "xlb_frontends 2",
        "xlb_backends 6",
    ] {
        assert!(text.contains(family), "{family} in\n{text}");
    }
    let (status, _) = cluster
        .http_get(0, "127.0.0.1:10256".parse().unwrap(), "/healthz")
        .unwrap();
    assert_eq!(status, 200);
    // One clear log line per bad object, naming it.
    let log = cluster.agent_log(0);
    for object in [
        "default/bad-ip",
        "default/bad-port",
        "default/bad-proto",
        "EndpointSlice default/s",
    ] {
        assert_eq!(
            log.matches(object).count(),
            1,
            "{object} logged once:\n{log}"
        );
    }
}

/// With a backends map of 8 entries (`--backends-max`), the sample Service
/// (6 backends: 3 endpoints, TCP and UDP) fits and a second one with 10
/// does not: that one is reported on its Service, once, and the sample
/// Service keeps serving.
#[test]
fn a_service_that_does_not_fit_is_reported_and_the_others_serve() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    cluster
        .write_manifest(
            "sample.yaml",
            &scenario::manifests(&cluster, &["web-0", "web-1", "web-2"]),
        )
        .unwrap();
    // After the sample Service in frontend order (a higher ClusterIP).
    let endpoints: Vec<Endpoint> = (1..=10)
        .map(|i| Endpoint::ready(format!("10.250.0.{i}").parse().unwrap(), "node2"))
        .collect();
    let big = documents(&[
        service(
            "big",
            "10.96.0.200".parse().unwrap(),
            &[Port::tcp("", 80)],
            &["80"],
        ),
        endpoint_slice("big", "big-1", &[Port::tcp("", 80)], &endpoints),
    ]);
    cluster.write_manifest("big.yaml", &big).unwrap();
    cluster.start_agent(0, &["--backends-max", "8"]).unwrap();
    let log = eventually(
        "the Service that does not fit is reported",
        Duration::from_secs(5),
        || {
            let log = cluster.agent_log(0);
            ensure!(log.contains("Service default/big"), "{log}");
            Ok(log)
        },
    )
    .unwrap();
    assert!(log.contains("reason=\"capacity\""), "{log}");
    let backends = answering(&cluster, 30).unwrap();
    assert_eq!(backends.len(), 3, "{backends:?}");
    // Retried with backoff, and reported once however many retries.
    let metrics = "127.0.0.1:10249".parse().unwrap();
    eventually("retried", Duration::from_secs(10), || {
        let (_, text) = cluster.http_get(0, metrics, "/metrics")?;
        let retries: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("xlb_sync_retries_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        ensure!(retries >= 3, "{retries} retries");
        Ok(())
    })
    .unwrap();
    let log = cluster.agent_log(0);
    let reports = log
        .lines()
        .filter(|l| l.contains("skipped") && l.contains("Service default/big"))
        .count();
    assert_eq!(reports, 1, "{log}");
}
