//! Label selectors (`matchLabels` + `matchExpressions`) as the API server validates and evaluates them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown operator {0:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator(String),
    #[error("operator {op} on key {key:?} needs at least one value")]
    MissingValues { key: String, op: Op },
    #[error("operator {op} on key {key:?} takes no values")]
    UnexpectedValues { key: String, op: Op },
    #[error("invalid label key {0:?}")]
    InvalidKey(String),
    #[error("invalid label value {value:?} for key {key:?}")]
    InvalidValue { key: String, value: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::In => "In",
            Op::NotIn => "NotIn",
            Op::Exists => "Exists",
            Op::DoesNotExist => "DoesNotExist",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Op::In => v.is_some_and(|v| self.values.contains(v)),
            // An absent key satisfies NotIn, exactly like labels.Selector upstream.
            Op::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
        }
    }
}

/// A validated selector: the AND of its requirements (`matchLabels` entries become `In` with one
/// value). No requirements means "everything", which is what `{}` says.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

impl Selector {
    /// Matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.reqs
    }

    pub fn parse(sel: &LabelSelector) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            validate_key(k)?;
            validate_value(k, v)?;
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::In,
                values: BTreeSet::from([v.clone()]),
            });
        }
        for e in sel.match_expressions.iter().flatten() {
            validate_key(&e.key)?;
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => return Err(SelectorError::UnknownOperator(other.to_string())),
            };
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key: e.key.clone(),
                        op,
                    });
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key: e.key.clone(),
                        op,
                    });
                }
                _ => {}
            }
            for v in &values {
                validate_value(&e.key, v)?;
            }
            reqs.push(Requirement {
                key: e.key.clone(),
                op,
                values,
            });
        }
        // Canonical order so that equal selectors compare equal and print the same way.
        reqs.sort();
        reqs.dedup();
        Ok(Self { reqs })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    /// kubectl's selector syntax, e.g. `app=web,tier in (a,b),!legacy`; `{}` prints as `(all)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("(all)");
        }
        for (i, r) in self.reqs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let vals = || r.values.iter().cloned().collect::<Vec<_>>().join(",");
            match r.op {
                Op::In if r.values.len() == 1 => write!(f, "{}={}", r.key, vals())?,
                Op::In => write!(f, "{} in ({})", r.key, vals())?,
                Op::NotIn => write!(f, "{} notin ({})", r.key, vals())?,
                Op::Exists => write!(f, "{}", r.key)?,
                Op::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// `[prefix/]name` as the API server accepts label keys.
pub fn validate_key(key: &str) -> Result<(), SelectorError> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_name_part(name),
        None => is_name_part(key),
    };
    if ok {
        Ok(())
    } else {
        Err(SelectorError::InvalidKey(key.to_string()))
    }
}

pub fn validate_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || is_name_part(value) {
        Ok(())
    } else {
        Err(SelectorError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: if values.is_empty() {
                    None
                } else {
                    Some(values.iter().map(|s| s.to_string()).collect())
                },
            }]),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s.to_string(), "(all)");
    }

    #[test]
    fn match_labels_is_an_and() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "fe")])),
            match_expressions: None,
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "be")])));
        assert_eq!(s.to_string(), "app=web,tier=fe");
    }

    #[test]
    fn operators() {
        let in_ = Selector::parse(&expr("pod", "In", &["a", "b"])).unwrap();
        assert!(in_.matches(&labels(&[("pod", "a")])));
        assert!(in_.matches(&labels(&[("pod", "b")])));
        assert!(!in_.matches(&labels(&[("pod", "c")])));
        assert!(!in_.matches(&labels(&[])));

        let not_in = Selector::parse(&expr("pod", "NotIn", &["a"])).unwrap();
        assert!(!not_in.matches(&labels(&[("pod", "a")])));
        assert!(not_in.matches(&labels(&[("pod", "b")])));
        assert!(not_in.matches(&labels(&[])), "absent key satisfies NotIn");

        let exists = Selector::parse(&expr("pod", "Exists", &[])).unwrap();
        assert!(exists.matches(&labels(&[("pod", "")])));
        assert!(!exists.matches(&labels(&[("other", "a")])));

        let dne = Selector::parse(&expr("pod", "DoesNotExist", &[])).unwrap();
        assert!(!dne.matches(&labels(&[("pod", "a")])));
        assert!(dne.matches(&labels(&[("other", "a")])));
        assert_eq!(dne.to_string(), "!pod");
    }

    #[test]
    fn labels_and_expressions_combine_with_and() {
        let mut s = expr("tier", "NotIn", &["db"]);
        s.match_labels = Some(labels(&[("app", "web")]));
        let s = Selector::parse(&s).unwrap();
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[("tier", "fe")])));
    }

    #[test]
    fn invalid_inputs_are_rejected() {
        assert_eq!(
            Selector::parse(&expr("pod", "Equals", &["a"])),
            Err(SelectorError::UnknownOperator("Equals".into()))
        );
        assert!(matches!(
            Selector::parse(&expr("pod", "in", &["a"])),
            Err(SelectorError::UnknownOperator(_))
        ));
        assert!(matches!(
            Selector::parse(&expr("pod", "In", &[])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            Selector::parse(&expr("pod", "NotIn", &[])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            Selector::parse(&expr("pod", "Exists", &["a"])),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(matches!(
            Selector::parse(&expr("pod", "DoesNotExist", &["a"])),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        for bad in ["", "-a", "a b", "x/", "/a", "Upper.Case/a", &"k".repeat(64)] {
            assert!(
                matches!(
                    Selector::parse(&expr(bad, "Exists", &[])),
                    Err(SelectorError::InvalidKey(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Selector::parse(&expr("pod", "In", &["bad value"])),
            Err(SelectorError::InvalidValue { .. })
        ));
        assert!(matches!(
            Selector::parse(&LabelSelector {
                match_labels: Some(labels(&[("k", "-x")])),
                match_expressions: None
            }),
            Err(SelectorError::InvalidValue { .. })
        ));
        // Valid oddities the API server accepts.
        assert!(Selector::parse(&expr("kubernetes.io/metadata.name", "In", &["x"])).is_ok());
        assert!(Selector::parse(&expr("a_b.c-d", "In", &[""])).is_ok());
    }
}
