//! The ADD result, in whichever spec version the runtime asked for, and reading our own earlier
//! result back (CHECK's prevResult).

use crate::config::{format_mac, version_at_least};
use serde_json::{Map, Value, json};
use std::net::Ipv4Addr;
use vpcnet_api::POD_GATEWAY;

/// What ADD wired up; turned into spec JSON by [`render`].
#[derive(Debug, Clone)]
pub struct Attachment {
    pub host_veth: String,
    pub host_mac: [u8; 6],
    pub ifname: String,
    pub pod_mac: [u8; 6],
    pub netns: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

/// Builds the result for `version`. When chained after another plugin, its `prevResult` entries are
/// kept and ours appended (interface indices shifted accordingly).
pub fn render(version: &str, prev: Option<&Value>, att: &Attachment) -> Value {
    let v1 = version_at_least(version, "1.0.0");
    // Interface MTU only entered the result format in 1.1.0.
    let with_mtu = version_at_least(version, "1.1.0");
    let mut out = match prev {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    out.insert("cniVersion".into(), json!(version));

    let mut interfaces = take_array(&mut out, "interfaces");
    let base = interfaces.len();
    let mut host = json!({"name": att.host_veth, "mac": format_mac(&att.host_mac)});
    let mut pod = json!({
        "name": att.ifname,
        "mac": format_mac(&att.pod_mac),
        "sandbox": att.netns,
    });
    if with_mtu {
        host["mtu"] = json!(att.mtu);
        pod["mtu"] = json!(att.mtu);
    }
    interfaces.push(host);
    interfaces.push(pod);

    let mut ips = take_array(&mut out, "ips");
    ips.push(json!({
        "address": format!("{}/32", att.ip),
        "gateway": POD_GATEWAY.to_string(),
        "interface": base + 1,
    }));
    // 0.3.x/0.4.0 require a "version" per address; 1.x removed the field.
    for ip in &mut ips {
        if let Some(obj) = ip.as_object_mut() {
            if v1 {
                obj.remove("version");
            } else if !obj.contains_key("version") {
                let is_v6 = obj
                    .get("address")
                    .and_then(Value::as_str)
                    .is_some_and(|a| a.contains(':'));
                obj.insert("version".into(), json!(if is_v6 { "6" } else { "4" }));
            }
        }
    }

    let mut routes = take_array(&mut out, "routes");
    routes.push(json!({"dst": "0.0.0.0/0", "gw": POD_GATEWAY.to_string()}));

    out.insert("interfaces".into(), Value::Array(interfaces));
    out.insert("ips".into(), Value::Array(ips));
    out.insert("routes".into(), Value::Array(routes));
    out.entry("dns").or_insert_with(|| json!({}));
    Value::Object(out)
}

fn take_array(m: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match m.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

/// What a prevResult says about our pod interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevAttachment {
    pub ip: Ipv4Addr,
    pub mac: Option<String>,
}

/// Finds the IPv4 address assigned to `ifname` inside a sandbox in a prevResult. Later plugins in a
/// chain may have appended entries, so we look ours up by interface rather than by position.
pub fn find_prev(prev: &Value, ifname: &str) -> Option<PrevAttachment> {
    let interfaces = prev.get("interfaces").and_then(Value::as_array);
    let pod_index = interfaces.and_then(|ifs| {
        ifs.iter().position(|i| {
            i.get("name").and_then(Value::as_str) == Some(ifname)
                && i.get("sandbox")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
        })
    });
    let mac = pod_index
        .and_then(|i| interfaces?.get(i)?.get("mac")?.as_str())
        .map(str::to_string);
    let ips = prev.get("ips").and_then(Value::as_array)?;
    let ipv4_of = |entry: &Value| -> Option<Ipv4Addr> {
        let addr = entry.get("address")?.as_str()?;
        addr.split('/').next()?.parse().ok()
    };
    let by_iface = pod_index.and_then(|idx| {
        ips.iter()
            .filter(|e| e.get("interface").and_then(Value::as_u64) == Some(idx as u64))
            .find_map(ipv4_of)
    });
    let ip = by_iface.or_else(|| {
        ips.iter()
            .filter(|e| e.get("gateway").and_then(Value::as_str) == Some(&POD_GATEWAY.to_string()))
            .find_map(ipv4_of)
    })?;
    Some(PrevAttachment { ip, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att() -> Attachment {
        Attachment {
            host_veth: "vpc0123456789a".into(),
            host_mac: [0xee; 6],
            ifname: "eth0".into(),
            pod_mac: [2, 0, 0, 0, 0, 1],
            netns: "/run/netns/x".into(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            mtu: 1450,
        }
    }

    #[test]
    fn v1_result_shape() {
        let r = render("1.0.0", None, &att());
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][0]["name"], "vpc0123456789a");
        assert_eq!(r["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
        assert!(r["interfaces"][0].get("sandbox").is_none());
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["mac"], "02:00:00:00:00:01");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/x");
        assert!(r["interfaces"][1].get("mtu").is_none());
        assert_eq!(r["ips"][0]["address"], "10.0.0.5/32");
        assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(r["routes"][0]["gw"], "169.254.1.1");
        assert_eq!(r["dns"], json!({}));
    }

    #[test]
    fn v11_has_interface_mtu() {
        let r = render("1.1.0", None, &att());
        assert_eq!(r["interfaces"][1]["mtu"], 1450);
    }

    #[test]
    fn old_versions_carry_ip_version() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let r = render(v, None, &att());
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0]["version"], "4", "{v}");
        }
    }

    #[test]
    fn chained_after_another_plugin_appends() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "lo", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "fd00::2/64", "interface": 0}],
            "dns": {"nameservers": ["10.0.0.10"]}
        });
        let r = render("0.4.0", Some(&prev), &att());
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["ips"][0]["version"], "6");
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["dns"]["nameservers"][0], "10.0.0.10");
    }

    #[test]
    fn prev_result_is_read_back() {
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            let r = render(v, None, &att());
            let p = find_prev(&r, "eth0").unwrap();
            assert_eq!(p.ip, Ipv4Addr::new(10, 0, 0, 5));
            assert_eq!(p.mac.as_deref(), Some("02:00:00:00:00:01"));
        }
        assert!(find_prev(&json!({}), "eth0").is_none());
        assert!(find_prev(&json!({"ips": []}), "eth0").is_none());
    }
}
