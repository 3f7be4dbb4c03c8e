//! `xlb services|backends|conntrack|affinity|stats`: the pinned maps of a running (or
//! stopped) agent, as a table or as JSON.

use std::{fmt::Write, net::Ipv4Addr, path::Path};

use lb_common::{
    CtEntry, CtKey, Reason, ct_flags, ct_state, direction, ipv4_octets, port_host, scope,
};
use serde_json::{Value, json};

use crate::{Error, Maps, clock::monotonic_coarse_ns, dataplane::Dataplane, model::Protocol};

/// How to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(ipv4_octets(raw))
}

fn proto(number: u8) -> String {
    Protocol::from_number(number).map_or_else(|| number.to_string(), |p| p.to_string())
}

fn addr(raw_ip: u32, raw_port: u16) -> String {
    format!("{}:{}", ip(raw_ip), port_host(raw_port))
}

/// Rows of cells: the first row is the header.
fn render(format: Format, rows: Vec<Vec<String>>, json: Value) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(&json).expect("JSON values serialize") + "\n";
    }
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Whether `filter` (`name`, `namespace/name` or `namespace/name:port`)
/// names the Service port `service_port` (`namespace/name[:port]`).
fn names_service(filter: &str, service_port: &str) -> bool {
    let service = service_port.split(':').next().unwrap_or(service_port);
    let name = service.split('/').nth(1).unwrap_or(service);
    filter == service_port || filter == service || filter == name
}

/// Frontends with the Service port they belong to and their backends, tier
/// by tier; with `service`, only that Service's (`name`,
/// `namespace/name`, or `namespace/name:port`).
pub fn services(bpffs: &Path, format: Format, service: Option<&str>) -> Result<String, Error> {
    let maps = Maps::open_pinned(bpffs)?;
    let state = maps.read()?;
    let mut names = std::collections::HashMap::new();
    for entry in maps.frontend_names.iter() {
        let (id, name) = entry.map_err(Error::map(lb_common::maps::FRONTEND_NAMES))?;
        names.insert(id, name.as_str().to_owned());
    }
    let mut rows = vec![vec![
        "FRONTEND".into(),
        "PROTO".into(),
        "SCOPE".into(),
        "SERVICE".into(),
        "ID".into(),
        "BACKENDS".into(),
    ]];
    let mut json = Vec::new();
    for (key, frontend) in &state.frontends {
        let name = names.get(&frontend.id).map_or("", String::as_str);
        if service.is_some_and(|filter| !names_service(filter, name)) {
            continue;
        }
        let slots = state.slots_of(frontend);
        let mut start = 0;
        let mut tiers = Vec::new();
        for len in frontend.tier_len.iter().map(|l| usize::from(*l)) {
            let tier: Vec<String> = slots
                .get(start..start + len)
                .unwrap_or_default()
                .iter()
                .map(|id| match state.backends.get(id) {
                    Some(b) => addr(b.addr, b.port),
                    None => format!("#{id}?"),
                })
                .collect();
            start += len;
            tiers.push(tier);
        }
        while tiers.len() > 1 && tiers.last().is_some_and(Vec::is_empty) {
            tiers.pop();
        }
        let scope = if key.scope == scope::EXTERNAL {
            "external"
        } else {
            "internal"
        };
        let shown: Vec<String> = tiers.iter().map(|t| t.join(",")).collect();
        rows.push(vec![
            addr(key.addr, key.port),
            proto(key.proto),
            scope.into(),
            if name.is_empty() {
                "?".into()
            } else {
                name.into()
            },
            frontend.id.to_string(),
            if shown.iter().all(String::is_empty) {
                "(none)".into()
            } else {
                shown.join(" | ")
            },
        ]);
        json.push(json!({
            "frontend": addr(key.addr, key.port),
            "protocol": proto(key.proto),
            "scope": scope,
            "service": name,
            "id": frontend.id,
            "tiers": tiers,
        }));
    }
    Ok(render(format, rows, Value::Array(json)))
}

/// Backends by id.
pub fn backends(bpffs: &Path, format: Format) -> Result<String, Error> {
    let state = Maps::open_pinned(bpffs)?.read()?;
    let mut rows = vec![vec!["ID".into(), "BACKEND".into(), "PROTO".into()]];
    let mut json = Vec::new();
    for (id, backend) in &state.backends {
        rows.push(vec![
            id.to_string(),
            addr(backend.addr, backend.port),
            proto(backend.proto),
        ]);
        json.push(json!({"id": id, "backend": addr(backend.addr, backend.port), "protocol": proto(backend.proto)}));
    }
    Ok(render(format, rows, Value::Array(json)))
}

/// Conntrack entries with their age and the time left.
pub fn conntrack(bpffs: &Path, format: Format) -> Result<String, Error> {
    let maps = Maps::open_pinned(bpffs)?;
    let now = monotonic_coarse_ns();
    let mut entries: Vec<(CtKey, CtEntry)> = maps.conntrack.iter().filter_map(Result::ok).collect();
    entries.sort_by_key(|(key, _)| *key);
    let mut rows = vec![vec![
        "DIR".into(),
        "PROTO".into(),
        "SOURCE".into(),
        "DESTINATION".into(),
        "NAT".into(),
        "SNAT".into(),
        "STATE".into(),
        "BACKEND".into(),
        "EXPIRES".into(),
    ]];
    let mut json = Vec::new();
    for (key, entry) in entries {
        let dir = if key.direction == direction::FORWARD {
            "forward"
        } else {
            "reply"
        };
        let state = match entry.state {
            ct_state::NEW => "new",
            ct_state::ESTABLISHED => "established",
            ct_state::CLOSING => "closing",
            _ => "?",
        };
        let left_s =
            (entry.last_seen_ns + entry.lifetime_ns(key.proto)).saturating_sub(now) / 1_000_000_000;
        // The client end's translation: the new source of a forward entry,
        // the new destination of a reply entry.
        let snat =
            (entry.flags & ct_flags::SNAT != 0).then(|| addr(entry.peer_addr, entry.peer_port));
        rows.push(vec![
            dir.into(),
            proto(key.proto),
            addr(key.saddr, key.sport),
            addr(key.daddr, key.dport),
            addr(entry.nat_addr, entry.nat_port),
            snat.clone().unwrap_or_else(|| "-".into()),
            state.into(),
            entry.backend_id.to_string(),
            format!("{left_s}s"),
        ]);
        json.push(json!({
            "direction": dir,
            "protocol": proto(key.proto),
            "source": addr(key.saddr, key.sport),
            "destination": addr(key.daddr, key.dport),
            "nat": addr(entry.nat_addr, entry.nat_port),
            "snat": snat,
            "external": entry.flags & ct_flags::EXTERNAL != 0,
            "state": state,
            "backend_id": entry.backend_id,
            "frontend_id": entry.frontend_id,
            "expires_in_seconds": left_s,
        }));
    }
    Ok(render(format, rows, Value::Array(json)))
}

/// Datapath counters by verdict and drop reason.
pub fn stats(bpffs: &Path, format: Format) -> Result<String, Error> {
    let totals = Maps::open_pinned(bpffs)?.counter_totals()?;
    let mut rows = vec![vec![
        "REASON".into(),
        "VERDICT".into(),
        "PACKETS".into(),
        "BYTES".into(),
    ]];
    let mut json = Vec::new();
    for reason in Reason::ALL {
        let total = totals[reason as usize];
        let verdict = if reason.is_drop() { "drop" } else { "pass" };
        rows.push(vec![
            reason.name().into(),
            verdict.into(),
            total.packets.to_string(),
            total.bytes.to_string(),
        ]);
        json.push(json!({"reason": reason.name(), "verdict": verdict, "packets": total.packets, "bytes": total.bytes}));
    }
    Ok(render(format, rows, Value::Array(json)))
}

/// ClientIP affinity entries with the time they have left.
pub fn affinity(bpffs: &Path, format: Format) -> Result<String, Error> {
    let maps = Maps::open_pinned(bpffs)?;
    let state = maps.read()?;
    let now = monotonic_coarse_ns();
    let frontends: std::collections::BTreeMap<u32, _> = state
        .frontends
        .iter()
        .map(|(k, f)| (f.id, (*k, *f)))
        .collect();
    let mut entries: Vec<_> = maps.affinity.iter().filter_map(Result::ok).collect();
    entries.sort_by_key(|(key, _)| *key);
    let mut rows = vec![vec![
        "FRONTEND".into(),
        "PROTO".into(),
        "CLIENT".into(),
        "BACKEND".into(),
        "EXPIRES".into(),
    ]];
    let mut json = Vec::new();
    for (key, entry) in entries {
        let (frontend, proto_name, timeout_s) = match frontends.get(&key.frontend_id) {
            Some((k, f)) => (addr(k.addr, k.port), proto(k.proto), f.affinity_timeout_s),
            None => (format!("#{}", key.frontend_id), "?".into(), 0),
        };
        let backend = state.backends.get(&entry.backend_id).map_or_else(
            || format!("#{}?", entry.backend_id),
            |b| addr(b.addr, b.port),
        );
        let left_s = (entry.last_used_ns + u64::from(timeout_s) * 1_000_000_000)
            .saturating_sub(now)
            / 1_000_000_000;
        rows.push(vec![
            frontend.clone(),
            proto_name.clone(),
            ip(key.client_addr).to_string(),
            backend.clone(),
            format!("{left_s}s"),
        ]);
        json.push(json!({
            "frontend": frontend,
            "protocol": proto_name,
            "client": ip(key.client_addr).to_string(),
            "backend": backend,
            "expires_in_seconds": left_s,
        }));
    }
    Ok(render(format, rows, Value::Array(json)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_service_is_named_by_name_namespace_and_port() {
        let named = |filter| super::names_service(filter, "shop/web:http");
        assert!(named("web"));
        assert!(named("shop/web"));
        assert!(named("shop/web:http"));
        assert!(!named("shop/web:metrics"));
        assert!(!named("default/web"));
        assert!(!named("we"));
        assert!(super::names_service("web", "shop/web"));
    }
}
