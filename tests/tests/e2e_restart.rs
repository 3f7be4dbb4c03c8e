//! End to end: the agent's exit never drops a flow. An established TCP
//! connection through a ClusterIP keeps working across `kill -9` of the
//! agent and its restart, and the restarted agent reconciles (no flush).

use std::time::Duration;

use anyhow::ensure;
use xlb_tests::{
    cluster::eventually,
    echo::Connection,
    require_root,
    scenario::{self, frontend},
};

#[test]
fn live_connection_survives_kill_and_restart_of_the_agent() {
    require_root!();
    let mut cluster = scenario::running().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    // A client thread in the client pod holds one connection open and makes
    // a request each time it is told to.
    let handle = cluster
        .pod("client")
        .ns
        .spawn(move || {
            let mut conn = Connection::open(frontend()).expect("connect");
            while rx.recv().is_ok() {
                reply_tx.send(conn.request().map(|r| r.from)).unwrap();
            }
        })
        .unwrap();
    let ask = || {
        tx.send(()).unwrap();
        reply_rx.recv().unwrap()
    };
    let backend = ask().expect("first request");
    cluster.kill_agent(0).unwrap();
    cluster.kill_agent(1).unwrap();
    assert_eq!(
        ask().expect("request with the agents dead").as_str(),
        backend
    );
    cluster.start_agents().unwrap();
    assert_eq!(ask().expect("request after the restart").as_str(), backend);
    // The restarted agent found everything programmed: nothing rewritten.
    let restart_sync = eventually("the restarted agent synced", Duration::from_secs(2), || {
        let log = cluster.agent_log(0);
        let syncs: Vec<&str> = log.lines().filter(|l| l.contains("synced")).collect();
        ensure!(syncs.len() >= 2, "{} syncs logged", syncs.len());
        Ok(syncs[1].to_owned())
    })
    .unwrap();
    assert!(restart_sync.contains("writes=0 "), "{restart_sync}");
    // New connections are balanced as before.
    cluster
        .pod("client")
        .run(|| xlb_tests::echo::tcp_request(frontend()))
        .unwrap();
    drop(tx);
    handle.join().unwrap();
}

#[test]
fn cleanup_detaches_everything_and_removes_the_pins() {
    require_root!();
    let mut cluster = scenario::running().unwrap();
    cluster
        .pod("client")
        .run(|| xlb_tests::echo::tcp_request(frontend()))
        .unwrap();
    cluster.kill_agent(0).unwrap();
    let bpffs = cluster.bpffs(0).to_owned();
    // The inspection CLI reads the pins of a stopped agent.
    for command in ["services", "backends", "conntrack", "affinity", "stats"] {
        let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
            .args([command, "--bpffs"])
            .arg(&bpffs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "xlb {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
        .args(["conntrack", "--bpffs"])
        .arg(&bpffs)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.96.0.10:8080"),
        "the flow is listed"
    );
    let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
        .args(["services", "--service", scenario::SERVICE, "--bpffs"])
        .arg(&bpffs)
        .output()
        .unwrap();
    let services = String::from_utf8_lossy(&out.stdout);
    assert!(
        services.contains(&format!("default/{}", scenario::SERVICE)),
        "frontends still named: {services}"
    );
    let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(&bpffs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("detached 12 program link(s)"),
        "web-0, web-1 and client, both directions, eth0's nodeport_tc, and the five \
         socket hooks on the node's cgroup"
    );
    assert!(!bpffs.exists(), "pins removed");
    // Nothing translates the ClusterIP on node1 any more (the kernel frees
    // an unpinned link after a grace period).
    eventually("the datapath is gone", Duration::from_secs(2), || {
        let result = cluster
            .pod("client")
            .run(|| xlb_tests::echo::tcp_request(frontend()));
        ensure!(result.is_err(), "{result:?}");
        Ok(())
    })
    .unwrap();
}
