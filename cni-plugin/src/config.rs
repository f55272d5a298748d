//! The network configuration the runtime hands us on stdin.

use crate::errors::{CniError, Result};
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use vpcnet_api::{code, quote};

/// Spec versions whose result format we can produce. Below 0.3.0 the result shape is different
/// (no interfaces list), and no runtime we target still sends it.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What error JSON says when the input was too broken to tell us the caller's version.
pub const FALLBACK_VERSION: &str = "1.1.0";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub release_queue: Option<PathBuf>,
    /// Append one line per invocation here (also settable with `VPCNET_LOG_FILE`, but runtimes do
    /// not always pass their environment through to plugins).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin. Broken JSON is a decode error (6); JSON of the wrong shape is an invalid config
    /// (7); a version we cannot answer in is 1.
    pub fn parse(input: &[u8]) -> Result<NetConf> {
        let value: serde_json::Value = serde_json::from_slice(input).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("cannot decode the network configuration on stdin: {e}"),
            )
        })?;
        let Some(version) = value.get("cniVersion").and_then(|v| v.as_str()) else {
            return Err(CniError::config(
                "the network configuration has no string \"cniVersion\"",
            ));
        };
        check_version(version)?;
        let version = version.to_string();
        let mut conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::config(format!("invalid network configuration: {e}"))
                .with_details(format!("cniVersion {version}"))
        })?;
        if conf.network.as_deref() == Some("") {
            conf.network = None;
        }
        if let Some(mtu) = conf.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(CniError::config(format!(
                "mtu {mtu} is out of range (68..=65535)"
            )));
        }
        Ok(conf)
    }

    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(vpcnet_api::DEFAULT_SOCKET))
    }

    pub fn release_queue(&self) -> PathBuf {
        self.release_queue
            .clone()
            .unwrap_or_else(|| PathBuf::from(vpcnet_api::DEFAULT_RELEASE_QUEUE))
    }

    /// Addresses from the `ips` capability. A prefix length is accepted and ignored: the pod always
    /// gets a /32, the subnet is the daemon's business.
    pub fn static_ips(&self) -> Result<Vec<Ipv4Addr>> {
        self.runtime_config
            .ips
            .iter()
            .map(|s| {
                parse_ipv4_maybe_cidr(s).ok_or_else(|| {
                    CniError::config(format!(
                        "runtimeConfig.ips: {} is not an IPv4 address (vpcnet is IPv4-only)",
                        quote(s)
                    ))
                })
            })
            .collect()
    }

    /// MAC from the `mac` capability, if any.
    pub fn mac(&self) -> Result<Option<[u8; 6]>> {
        match &self.runtime_config.mac {
            None => Ok(None),
            Some(s) => parse_mac(s)
                .map(Some)
                .map_err(|why| CniError::config(format!("runtimeConfig.mac {}: {why}", quote(s)))),
        }
    }
}

pub fn check_version(version: &str) -> Result<()> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CNI version {} is not supported; vpcnet supports {}",
                quote(version),
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

/// Orders spec versions; only ever called with members of [`SUPPORTED_VERSIONS`].
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(min)
}

pub fn parse_ipv4_maybe_cidr(s: &str) -> Option<Ipv4Addr> {
    let addr = match s.split_once('/') {
        Some((addr, prefix)) => {
            let p: u8 = prefix.parse().ok()?;
            if p > 32 {
                return None;
            }
            addr
        }
        None => s,
    };
    addr.trim().parse().ok()
}

/// A unicast MAC; a multicast one would make the pod unreachable.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err("expected six hex octets like 02:00:00:aa:bb:cc".into());
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(format!("octet {} is not two hex digits", quote(p)));
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| format!("octet {} is not hex", quote(p)))?;
    }
    if mac[0] & 1 != 0 {
        return Err("is a multicast address".into());
    }
    if mac == [0; 6] {
        return Err("is all zeroes".into());
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"vpcnet"}"#).unwrap();
        assert_eq!(c.socket(), PathBuf::from(vpcnet_api::DEFAULT_SOCKET));
        assert_eq!(
            c.release_queue(),
            PathBuf::from(vpcnet_api::DEFAULT_RELEASE_QUEUE)
        );
        assert_eq!(c.mtu, None);
        assert_eq!(c.network, None);
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn unknown_fields_are_ignored_and_known_ones_read() {
        let c = parse(
            r#"{"cniVersion":"0.4.0","name":"n","type":"vpcnet","socket":"/tmp/s.sock",
                "mtu":1400,"network":"blue","releaseQueue":"/tmp/q","whatever":{"a":1},
                "capabilities":{"ips":true,"mac":true},
                "runtimeConfig":{"ips":["10.0.0.5/24","10.0.0.6"],"mac":"02:11:22:33:44:55",
                                 "portMappings":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.socket(), PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.network.as_deref(), Some("blue"));
        assert_eq!(c.release_queue(), PathBuf::from("/tmp/q"));
        assert_eq!(
            c.static_ips().unwrap(),
            vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]
        );
        assert_eq!(c.mac().unwrap(), Some([2, 0x11, 0x22, 0x33, 0x44, 0x55]));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert_eq!(parse("not json").unwrap_err().code, code::DECODE);
        assert_eq!(parse("").unwrap_err().code, code::DECODE);
    }

    #[test]
    fn wrong_shapes_are_invalid_config() {
        assert_eq!(
            parse(r#"{"name":"n"}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","mtu":"big"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","mtu":20}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        let c = parse(r#"{"cniVersion":"1.0.0","runtimeConfig":{"ips":["fd00::1"]}}"#).unwrap();
        assert_eq!(c.static_ips().unwrap_err().code, code::INVALID_CONFIG);
        let c =
            parse(r#"{"cniVersion":"1.0.0","runtimeConfig":{"mac":"01:00:00:00:00:01"}}"#).unwrap();
        assert_eq!(c.mac().unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn unsupported_versions_are_code_1() {
        for v in ["0.1.0", "0.2.0", "2.0.0", ""] {
            let e = parse(&format!(r#"{{"cniVersion":"{v}"}}"#)).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
        }
        for v in SUPPORTED_VERSIONS {
            parse(&format!(r#"{{"cniVersion":"{v}"}}"#)).unwrap();
        }
    }

    #[test]
    fn valid_attachments_are_read() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":
                [{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![ValidAttachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn version_order() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02-AA-bb-00-00-01").unwrap(),
            [2, 0xaa, 0xbb, 0, 0, 1]
        );
        assert!(parse_mac("02:aa:bb:00:00").is_err());
        assert!(parse_mac("02:aa:bb:00:00:zz").is_err());
        assert_eq!(format_mac(&[0xee; 6]), "ee:ee:ee:ee:ee:ee");
    }
}
