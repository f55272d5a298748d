//! The CNI_* environment and the `CNI_ARGS` key/value list.

use crate::config::{parse_ipv4_maybe_cidr, parse_mac};
use crate::errors::{CniError, Result};
use std::net::Ipv4Addr;
use vpcnet_api::{PodRef, quote};

/// Linux `IFNAMSIZ` minus the terminating NUL.
pub const MAX_IFNAME: usize = 15;

#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Env {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Empty variables count as unset: runtimes send `CNI_NETNS=` on the second DEL.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Env {
        let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: non_empty("CNI_CONTAINERID"),
            netns: non_empty("CNI_NETNS"),
            ifname: non_empty("CNI_IFNAME"),
            args: get("CNI_ARGS").unwrap_or_default(),
        }
    }

    /// The container ID ends up in a file name (release queue) and in the veth name hash, so it
    /// gets the same check libcni applies.
    pub fn container_id(&self) -> Result<&str> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_CONTAINERID is not set"))?;
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok
            || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            || id.len() > 256
        {
            return Err(CniError::env(format!(
                "CNI_CONTAINERID {} is invalid: it must match [a-zA-Z0-9][a-zA-Z0-9_.-]* and be at \
                 most 256 bytes",
                quote(id)
            )));
        }
        Ok(id)
    }

    pub fn ifname(&self) -> Result<&str> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_IFNAME is not set"))?;
        validate_ifname(name)?;
        Ok(name)
    }

    pub fn netns(&self) -> Result<&str> {
        self.netns
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_NETNS is not set"))
    }
}

pub fn validate_ifname(name: &str) -> Result<()> {
    if name.len() > MAX_IFNAME
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(CniError::env(format!(
            "CNI_IFNAME {} is not a valid interface name (at most {MAX_IFNAME} bytes, \
             no '/', ':' or whitespace)",
            quote(name)
        )));
    }
    Ok(())
}

/// What we understand of `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod: PodRef,
    /// `IP=` (podman `--ip`, the reference `static` IPAM convention).
    pub ips: Vec<Ipv4Addr>,
    /// `MAC=` (podman `--mac-address`).
    pub mac: Option<[u8; 6]>,
}

/// Parses `K=V;K=V`. Like the reference plugins, a key we do not know is an error unless
/// `IgnoreUnknown` is true, so a typo in a static address is not silently dropped.
pub fn parse_cni_args(raw: &str) -> Result<CniArgs> {
    let mut pairs = Vec::new();
    for item in raw.split(';').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            CniError::env(format!(
                "CNI_ARGS entry {} is not of the form KEY=VALUE",
                quote(item)
            ))
        })?;
        pairs.push((k, v));
    }
    let ignore_unknown = pairs
        .iter()
        .any(|(k, v)| *k == "IgnoreUnknown" && (*v == "1" || v.eq_ignore_ascii_case("true")));
    let mut out = CniArgs::default();
    for (k, v) in pairs {
        match k {
            "IgnoreUnknown" => {}
            "K8S_POD_NAMESPACE" => out.pod.namespace = v.to_string(),
            "K8S_POD_NAME" => out.pod.name = v.to_string(),
            "K8S_POD_UID" => out.pod.uid = v.to_string(),
            "K8S_POD_INFRA_CONTAINER_ID" => out.pod.infra_container_id = v.to_string(),
            "IP" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    let ip = parse_ipv4_maybe_cidr(s).ok_or_else(|| {
                        CniError::env(format!(
                            "CNI_ARGS IP: {} is not an IPv4 address (vpcnet is IPv4-only)",
                            quote(s)
                        ))
                    })?;
                    out.ips.push(ip);
                }
            }
            "MAC" => {
                let mac = parse_mac(v)
                    .map_err(|why| CniError::env(format!("CNI_ARGS MAC={}: {why}", quote(v))))?;
                out.mac = Some(mac);
            }
            _ if ignore_unknown => {}
            _ => {
                return Err(CniError::env(format!(
                    "CNI_ARGS key {} is not understood by vpcnet (set IgnoreUnknown=1 to \
                     ignore unknown keys)",
                    quote(k)
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpcnet_api::code;

    #[test]
    fn containerd_style_args() {
        let a = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        )
        .unwrap();
        assert_eq!(a.pod.namespace, "default");
        assert_eq!(a.pod.name, "web-0");
        assert_eq!(a.pod.infra_container_id, "abc");
        assert_eq!(a.pod.uid, "u-1");
        assert!(a.ips.is_empty());
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        let e = parse_cni_args("FOO=bar;K8S_POD_NAME=x").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("FOO"), "{}", e.msg);
        assert!(parse_cni_args("FOO=bar;IgnoreUnknown=true").is_ok());
        assert!(parse_cni_args("IgnoreUnknown=TRUE;FOO=bar").is_ok());
        assert!(parse_cni_args("IgnoreUnknown=0;FOO=bar").is_err());
    }

    #[test]
    fn static_ip_and_mac() {
        let a = parse_cni_args("IgnoreUnknown=1;IP=10.1.2.3/24;MAC=02:00:00:00:00:07").unwrap();
        assert_eq!(a.ips, vec![Ipv4Addr::new(10, 1, 2, 3)]);
        assert_eq!(a.mac, Some([2, 0, 0, 0, 0, 7]));
        let a = parse_cni_args("IP=10.1.2.3,10.1.2.4").unwrap();
        assert_eq!(a.ips.len(), 2);
        assert_eq!(
            parse_cni_args("IP=10.1.2.300").unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(
            parse_cni_args("IP=fd00::1").unwrap_err().code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn malformed_pairs_and_empty() {
        assert_eq!(parse_cni_args("").unwrap(), CniArgs::default());
        assert_eq!(parse_cni_args(";;").unwrap(), CniArgs::default());
        assert_eq!(
            parse_cni_args("novalue").unwrap_err().code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn env_validation() {
        let env = Env::from_lookup(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_CONTAINERID" => Some("../etc".into()),
            "CNI_NETNS" => Some(String::new()),
            "CNI_IFNAME" => Some("a-very-long-interface-name".into()),
            _ => None,
        });
        assert_eq!(env.command, "ADD");
        assert_eq!(env.container_id().unwrap_err().code, code::INVALID_ENV);
        let e = env.netns().unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
        assert_eq!(env.ifname().unwrap_err().code, code::INVALID_ENV);
        let env = Env::from_lookup(|_| None);
        assert!(env.ifname().unwrap_err().msg.contains("CNI_IFNAME"));
        assert!(
            env.container_id()
                .unwrap_err()
                .msg
                .contains("CNI_CONTAINERID")
        );
    }
}
