//! The one error type every verb returns; it always knows its CNI error code, so `main` can turn any
//! failure into spec error JSON without guessing.

use serde::Serialize;
use vpcnet_api::{ApiError, ClientError, MAX_MESSAGE, bounded, code, quote};

/// `msg` and `details` are bounded at construction (every constructor goes through [`CniError::new`]
/// or [`CniError::with_details`]): messages quote config and environment values, and no input may
/// make the runtime's error (or our log line) large.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

pub type Result<T> = std::result::Result<T, CniError>;

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: bounded(msg.into(), MAX_MESSAGE),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = bounded(details.into(), MAX_MESSAGE);
        self
    }

    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }

    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(code::IO, msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    pub fn check(msg: impl Into<String>) -> Self {
        Self::new(code::CHECK_FAILED, msg)
    }

    /// A failed daemon call. `verb` names what we asked for, so the message says what did not happen.
    pub fn daemon(verb: &str, socket: &str, err: ClientError) -> Self {
        // The path comes from the network configuration: quoted, so its length is bounded too.
        let socket = &quote(socket);
        match err {
            ClientError::Unreachable { source, .. } => Self::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "vpcnetd is not reachable at {socket}: {source} — is the vpcnet DaemonSet pod \
                     running on this node?"
                ),
            )
            .with_details(format!("{verb} was not sent")),
            ClientError::Io { source, .. } => Self::new(
                code::TRY_AGAIN_LATER,
                format!("vpcnetd at {socket} did not answer {verb}: {source}"),
            ),
            // During a rolling upgrade the plugin binary and the daemon can briefly disagree; the
            // runtime retrying later is the right reaction.
            ClientError::Version { got } => Self::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "vpcnetd at {socket} speaks protocol version {got}, this plugin speaks {}; \
                     plugin and daemon are from different releases",
                    vpcnet_api::PROTOCOL_VERSION
                ),
            ),
            ClientError::Decode(e) => Self::internal(format!(
                "vpcnetd at {socket} sent an undecodable answer to {verb}: {e}"
            )),
        }
    }

    /// Spec error JSON for the given result version.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            // Serializing plain strings cannot fail; this keeps even that path panic-free.
            format!(
                "{{\"cniVersion\":\"{cni_version}\",\"code\":{},\"msg\":\"unprintable error\"}}",
                self.code
            )
        })
    }
}

impl From<ApiError> for CniError {
    /// The daemon already picked the CNI code and wording; pass them through, bounded again because
    /// the answer may come from a daemon of another release.
    fn from(e: ApiError) -> Self {
        CniError::new(e.code, e.msg).with_details(e.details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::env("CNI_IFNAME is not set").with_details("x");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 4);
        assert_eq!(v["msg"], "CNI_IFNAME is not set");
        assert_eq!(v["details"], "x");
    }

    #[test]
    fn empty_details_are_omitted() {
        let text = CniError::config("bad").to_json("1.1.0");
        assert!(!text.contains("details"), "{text}");
    }

    #[test]
    fn api_errors_pass_through() {
        let e: CniError = ApiError::new(code::EXHAUSTED, "no free address")
            .with_details("subnet a")
            .into();
        assert_eq!(e.code, code::EXHAUSTED);
        assert_eq!(e.msg, "no free address");
        assert_eq!(e.details, "subnet a");
    }

    #[test]
    fn messages_are_bounded_at_construction() {
        let huge = "x".repeat(10 << 20);
        let e = CniError::config(huge.clone()).with_details(huge.clone());
        assert!(e.msg.len() <= MAX_MESSAGE && e.details.len() <= MAX_MESSAGE);
        let wire = ApiError {
            code: code::UNKNOWN_NETWORK,
            msg: huge.clone(),
            details: huge,
        };
        let e: CniError = wire.into();
        assert!(e.msg.len() <= MAX_MESSAGE && e.details.len() <= MAX_MESSAGE);
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["code"], code::UNKNOWN_NETWORK);
    }

    #[test]
    fn unreachable_daemon_is_try_again_and_names_the_socket() {
        let err = ClientError::Unreachable {
            path: "/run/x.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let e = CniError::daemon("allocate", "/run/x.sock", err);
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("/run/x.sock"), "{}", e.msg);
        assert!(e.msg.contains("DaemonSet"), "{}", e.msg);
    }
}
