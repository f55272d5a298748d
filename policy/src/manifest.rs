//! Kubernetes manifests — YAML or JSON documents, lists included — parsed and validated into the
//! [`crate::model`]. Pure: the agent's directory watcher reads the files and calls this.

use crate::PolicyError;
use crate::incremental::Change;
use crate::model::{ClusterState, Namespace, ObjRef, Pod, Policy};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn parse_files(files: &[(PathBuf, String)]) -> Result<ClusterState, PolicyError> {
    let parsed = files
        .iter()
        .map(|(path, text)| parse_file(path, text))
        .collect::<Result<Vec<_>, _>>()?;
    assemble(parsed.iter().map(|v| v.as_slice()))
}

/// One object of a manifest, validated, with where it came from (`file#document`).
#[derive(Debug, Clone)]
pub struct Object {
    origin: String,
    kind: ObjectKind,
}

impl Object {
    /// Where the object came from: `file#document`.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

#[derive(Debug, Clone)]
enum ObjectKind {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Policy(Arc<crate::model::Policy>),
}

/// Parses and validates one file's documents. The expensive half of reading the state: a
/// [`ManifestDir`] keeps the result per file and content, so a change to one file does not
/// re-parse the others.
///
/// Two passes: the first reads only each document's `apiVersion`, `kind` and name, skipping the
/// rest without building it; the second builds just the wanted documents, straight into their
/// Kubernetes types. So a file of ConfigMaps or Secrets costs a scan, not a tree of it in memory.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, PolicyError> {
    let err = |document: usize, reason: String| PolicyError::Manifest {
        file: path.to_path_buf(),
        document: document + 1,
        reason,
    };
    let mut wanted = BTreeMap::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let h = Header::deserialize(doc).map_err(|e| err(i, e.to_string()))?;
        match (h.api_version.as_str(), h.kind.as_str()) {
            ("v1", "Namespace" | "Pod" | "List") | ("networking.k8s.io/v1", "NetworkPolicy") => {
                wanted.insert(i, h);
            }
            // Ignoring a policy we cannot read would silently allow what it denies.
            (api, "NetworkPolicy") => {
                return Err(err(
                    i,
                    format!(
                        "NetworkPolicy with apiVersion {api:?}: only networking.k8s.io/v1 is supported"
                    ),
                ));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if wanted.is_empty() {
        return Ok(out);
    }
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Some(h) = wanted.get(&i) else { continue };
        let origin = format!("{}#{}", path.display(), i + 1);
        let describe = |e: &dyn std::fmt::Display| {
            let name = h.name.as_deref().unwrap_or("(unnamed)");
            format!("{} {name}: {e}", h.kind)
        };
        let kind = match h.kind.as_str() {
            "Namespace" => {
                let ns = core::Namespace::deserialize(doc).map_err(|e| err(i, describe(&e)))?;
                ObjectKind::Namespace(Arc::new(
                    Namespace::from_k8s(&ns).map_err(|e| err(i, e.to_string()))?,
                ))
            }
            "Pod" => {
                let pod = core::Pod::deserialize(doc).map_err(|e| err(i, describe(&e)))?;
                ObjectKind::Pod(Arc::new(
                    Pod::from_k8s(&pod).map_err(|e| err(i, e.to_string()))?,
                ))
            }
            "NetworkPolicy" => {
                let np = NetworkPolicy::deserialize(doc).map_err(|e| err(i, describe(&e)))?;
                ObjectKind::Policy(Arc::new(
                    crate::model::Policy::from_k8s(&np).map_err(|e| err(i, e.to_string()))?,
                ))
            }
            _ => {
                serde::Deserializer::deserialize_map(
                    doc,
                    ListVisitor {
                        origin: &origin,
                        out: &mut out,
                    },
                )
                .map_err(|e| err(i, e.to_string()))?;
                continue;
            }
        };
        out.push(Object { origin, kind });
    }
    Ok(out)
}

/// What a document is: its `apiVersion`, `kind` and `metadata.name`, everything else skipped.
/// Anything but a mapping (an empty document, a scalar) is no object and is ignored.
#[derive(Debug, Default)]
struct Header {
    api_version: String,
    kind: String,
    name: Option<String>,
}

/// The visitor methods of a lenient visitor: whatever is not a mapping gives the default.
macro_rules! default_unless_map {
    () => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(Default::default())
        }
        fn visit_enum<A: serde::de::EnumAccess<'de>>(
            self,
            data: A,
        ) -> Result<Self::Value, A::Error> {
            use serde::de::VariantAccess as _;
            let (serde::de::IgnoredAny, v) = data.variant()?;
            v.newtype_variant::<serde::de::IgnoredAny>()?;
            Ok(Default::default())
        }
    };
}

/// A string field's value; anything else reads as empty (and is skipped).
#[derive(Default)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text(s.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Text::default())
            }
            fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Text, A::Error> {
                use serde::de::VariantAccess as _;
                let (serde::de::IgnoredAny, v) = data.variant()?;
                v.newtype_variant::<serde::de::IgnoredAny>()?;
                Ok(Text::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// `metadata.name`, the rest of `metadata` skipped.
#[derive(Default)]
struct MetaName(Option<String>);

impl<'de> Deserialize<'de> for MetaName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MetaName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("object metadata")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<MetaName, A::Error> {
                let mut name = None;
                while let Some(Text(k)) = map.next_key::<Text>()? {
                    if k == "name" {
                        name = Some(map.next_value::<Text>()?.0);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(MetaName(name))
            }
            default_unless_map!();
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a Kubernetes object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Header, A::Error> {
                let mut h = Header::default();
                while let Some(Text(k)) = map.next_key::<Text>()? {
                    match k.as_str() {
                        "apiVersion" => h.api_version = map.next_value::<Text>()?.0,
                        "kind" => h.kind = map.next_value::<Text>()?.0,
                        "metadata" => h.name = map.next_value::<MetaName>()?.0,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(h)
            }
            default_unless_map!();
        }
        d.deserialize_any(V)
    }
}

/// A `kind: List` document: its items are built one at a time, each dropped once its object (if
/// it is of a wanted kind) is taken out.
struct ListVisitor<'a> {
    origin: &'a str,
    out: &'a mut Vec<Object>,
}

impl<'de> serde::de::Visitor<'de> for ListVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a List")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Text(k)) = map.next_key::<Text>()? {
            if k == "items" {
                map.next_value_seed(ItemsSeed {
                    origin: self.origin,
                    out: &mut *self.out,
                })?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct ItemsSeed<'a> {
    origin: &'a str,
    out: &'a mut Vec<Object>,
}

impl<'de> serde::de::DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ItemsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence of objects")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut j = 0;
        while let Some(item) = seq.next_element::<serde_yaml::Value>()? {
            objects(item, &format!("{} item {j}", self.origin), self.out)
                .map_err(|e| serde::de::Error::custom(format!("items[{j}]: {e}")))?;
            j += 1;
        }
        Ok(())
    }
}

/// Builds one state from parsed files; the same object twice fails the whole state.
pub fn assemble<'a>(
    files: impl IntoIterator<Item = &'a [Object]>,
) -> Result<ClusterState, PolicyError> {
    let files: Vec<&[Object]> = files.into_iter().collect();
    let mut state = ClusterState::new();
    // The state is its own duplicate check: a second map of every name (with a string per
    // object) costs as much as the state at 50,000 pods, for an error that is rare.
    for (n, o) in files.iter().flat_map(|f| f.iter()).enumerate() {
        let fresh = match &o.kind {
            ObjectKind::Namespace(ns) => state.insert_new_namespace(ns.clone()),
            ObjectKind::Pod(p) => state.insert_new_pod(p.clone()),
            ObjectKind::Policy(p) => state.insert_new_policy(p.clone()),
        };
        if !fresh {
            let (kind, name) = identify(o);
            let first = files
                .iter()
                .flat_map(|f| f.iter())
                .take(n)
                .find(|e| identify(e) == (kind, name.clone()))
                .map_or_else(String::new, |e| e.origin.clone());
            return Err(PolicyError::Duplicate {
                kind,
                name,
                first,
                second: o.origin.clone(),
            });
        }
    }
    Ok(state)
}

/// Brings `state`, assembled from a set of files, to that set with the `removed` files' objects
/// taken out and the `added` files' objects put in: a change of one file costs its objects, not
/// the state's. A file whose content changed is in both.
///
/// An added object equal to one it replaces keeps the replaced allocation (it is swapped into
/// `added` too), so consumers comparing states by pointer see only what really changed and the
/// two copies do not both stay in memory.
///
/// Returns whether the content changed, or `None` when an added object collides with one
/// already in the state (or another added one): `state` is then untouched (checked before
/// anything is taken out, so a source may update the state it publishes in place), and
/// [`assemble`] over every file says which two collide.
pub fn reassemble<'a, 'b>(
    state: &mut ClusterState,
    removed: impl IntoIterator<Item = &'a [Object]>,
    added: impl IntoIterator<Item = &'b mut [Object]>,
) -> Option<bool> {
    let removed: Vec<&[Object]> = removed.into_iter().collect();
    let mut added: Vec<&mut [Object]> = added.into_iter().collect();
    if collides(state, &removed, &added) {
        return None;
    }
    let mut namespaces = BTreeMap::new();
    let mut pods = BTreeMap::new();
    let mut policies = BTreeMap::new();
    for o in removed.iter().flat_map(|f| f.iter()) {
        match &o.kind {
            ObjectKind::Namespace(ns) => {
                if let Some(old) = state.take_namespace(&ns.name) {
                    namespaces.insert(ns.name.clone(), old);
                }
            }
            ObjectKind::Pod(p) => {
                let key = p.key();
                if let Some(old) = state.take_pod(&key) {
                    pods.insert(key, old);
                }
            }
            ObjectKind::Policy(p) => {
                let key = p.key();
                if let Some(old) = state.take_policy(&key) {
                    policies.insert(key, old);
                }
            }
        }
    }
    // Anything taken out and not put back equal is a change.
    let mut changed = false;
    for o in added.iter_mut().flat_map(|f| f.iter_mut()) {
        let fresh = match &mut o.kind {
            ObjectKind::Namespace(ns) => {
                match namespaces.remove(&ns.name) {
                    Some(old) if old == *ns => *ns = old,
                    _ => changed = true,
                }
                state.insert_new_namespace(ns.clone())
            }
            ObjectKind::Pod(p) => {
                match pods.remove(&p.key()) {
                    Some(old) if old == *p => *p = old,
                    _ => changed = true,
                }
                state.insert_new_pod(p.clone())
            }
            ObjectKind::Policy(p) => {
                match policies.remove(&p.key()) {
                    // As `ClusterState::same_content` compares policies.
                    Some(old) if Arc::ptr_eq(&old, p) || old.raw == p.raw => *p = old,
                    _ => changed = true,
                }
                state.insert_new_policy(p.clone())
            }
        };
        // Ruled out by `collides` before anything was taken out.
        debug_assert!(fresh, "a collision reassemble did not foresee");
    }
    Some(changed || !namespaces.is_empty() || !pods.is_empty() || !policies.is_empty())
}

/// Whether putting `added` in place of `removed` would give two objects one key: one added
/// object's key is in `state` and not taken out with `removed`, or two added objects share one.
fn collides(state: &ClusterState, removed: &[&[Object]], added: &[&mut [Object]]) -> bool {
    let mut gone: BTreeSet<(u8, ObjRef)> = BTreeSet::new();
    for o in removed.iter().flat_map(|f| f.iter()) {
        gone.insert(key_of(o));
    }
    let mut seen: BTreeSet<(u8, ObjRef)> = BTreeSet::new();
    for o in added.iter().flat_map(|f| f.iter()) {
        let key = key_of(o);
        let present = match &o.kind {
            ObjectKind::Namespace(ns) => state.namespace_shared(&ns.name).is_some(),
            ObjectKind::Pod(_) => state.pod_shared(&key.1).is_some(),
            ObjectKind::Policy(_) => state.policy_map().contains_key(&key.1),
        };
        if present && !gone.contains(&key) {
            return true;
        }
        if !seen.insert(key) {
            return true;
        }
    }
    false
}

/// An object's kind (in [`crate::incremental::diff_state`]'s order) and key.
fn key_of(o: &Object) -> (u8, ObjRef) {
    match &o.kind {
        ObjectKind::Namespace(ns) => (0, ObjRef::new("", ns.name.as_str())),
        ObjectKind::Pod(p) => (1, p.key()),
        ObjectKind::Policy(p) => (2, p.key()),
    }
}

/// [`reassemble`], also giving the object changes it made, as [`crate::incremental::diff_state`] of the state before
/// and after would give them: found among the objects of the files worked on, not by walking
/// the state. `None` (and `state` untouched) on a collision.
pub fn reassemble_changes(
    state: &mut ClusterState,
    removed: &[&[Object]],
    added: &mut [&mut [Object]],
) -> Option<Vec<Change>> {
    let mut before: BTreeMap<(u8, ObjRef), Option<Shared>> = BTreeMap::new();
    for o in removed
        .iter()
        .flat_map(|f| f.iter())
        .chain(added.iter().flat_map(|f| f.iter()))
    {
        before
            .entry(key_of(o))
            .or_insert_with_key(|key| shared(state, key));
    }
    reassemble(
        state,
        removed.iter().copied(),
        added.iter_mut().map(|f| &mut **f),
    )?;
    let mut changes = Vec::new();
    for (key, old) in before {
        let new = shared(state, &key);
        let same = match (&old, &new) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same(b),
            _ => false,
        };
        if same {
            continue;
        }
        let (kind, key) = key;
        changes.push(match (new, kind) {
            (Some(Shared::Namespace(n)), _) => Change::UpsertNamespace(n),
            (Some(Shared::Pod(p)), _) => Change::UpsertPod(p),
            (Some(Shared::Policy(p)), _) => Change::UpsertPolicy(p),
            (None, 0) => Change::DeleteNamespace(key.name),
            (None, 1) => Change::DeletePod(key),
            (None, _) => Change::DeletePolicy(key),
        });
    }
    Some(changes)
}

enum Shared {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Policy(Arc<Policy>),
}

impl Shared {
    /// As [`crate::incremental::diff_state`] compares: the same allocation, or equal.
    fn same(&self, other: &Shared) -> bool {
        match (self, other) {
            (Shared::Namespace(a), Shared::Namespace(b)) => Arc::ptr_eq(a, b) || a == b,
            (Shared::Pod(a), Shared::Pod(b)) => Arc::ptr_eq(a, b) || a == b,
            (Shared::Policy(a), Shared::Policy(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }
}

fn shared(state: &ClusterState, key: &(u8, ObjRef)) -> Option<Shared> {
    match key.0 {
        0 => state
            .namespace_shared(&key.1.name)
            .map(|n| Shared::Namespace(n.clone())),
        1 => state.pod_shared(&key.1).map(|p| Shared::Pod(p.clone())),
        _ => state
            .policy_map()
            .get(&key.1)
            .map(|p| Shared::Policy(p.clone())),
    }
}

fn identify(o: &Object) -> (&'static str, String) {
    match &o.kind {
        ObjectKind::Namespace(ns) => ("Namespace", ns.name.clone()),
        ObjectKind::Pod(p) => ("Pod", p.key().to_string()),
        ObjectKind::Policy(p) => ("NetworkPolicy", p.key().to_string()),
    }
}

fn objects(value: serde_yaml::Value, origin: &str, out: &mut Vec<Object>) -> Result<(), String> {
    if value.is_null() {
        return Ok(()); // an empty document, e.g. a trailing `---`
    }
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api, kind) = (field("apiVersion"), field("kind"));
    let describe = |e: &dyn std::fmt::Display| {
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("(unnamed)");
        format!("{kind} {name}: {e}")
    };
    let mut push = |kind| {
        out.push(Object {
            origin: origin.to_string(),
            kind,
        })
    };
    match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let ns: core::Namespace =
                serde_yaml::from_value(value.clone()).map_err(|e| describe(&e))?;
            push(ObjectKind::Namespace(Arc::new(
                Namespace::from_k8s(&ns).map_err(|e| e.to_string())?,
            )));
        }
        ("v1", "Pod") => {
            let pod: core::Pod = serde_yaml::from_value(value.clone()).map_err(|e| describe(&e))?;
            push(ObjectKind::Pod(Arc::new(
                Pod::from_k8s(&pod).map_err(|e| e.to_string())?,
            )));
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let np: NetworkPolicy =
                serde_yaml::from_value(value.clone()).map_err(|e| describe(&e))?;
            push(ObjectKind::Policy(Arc::new(
                crate::model::Policy::from_k8s(&np).map_err(|e| e.to_string())?,
            )));
        }
        // Ignoring a policy we cannot read would silently allow what it denies.
        (_, "NetworkPolicy") => {
            return Err(format!(
                "NetworkPolicy with apiVersion {api:?}: only networking.k8s.io/v1 is supported"
            ));
        }
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                objects(item, &format!("{origin} item {j}"), out)
                    .map_err(|e| format!("items[{j}]: {e}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incremental::diff_state;

    const A: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { team: a } }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: x, labels: { app: a } }
status: { podIP: 10.0.0.1 }
---
apiVersion: v1
kind: Pod
metadata: { name: b, namespace: x, labels: { app: b } }
status: { podIP: 10.0.0.2 }
"#;

    const B: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: c, namespace: x, labels: { app: c } }
status: { podIP: 10.0.0.3 }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: p, namespace: x }
spec: { podSelector: { matchLabels: { app: a } } }
"#;

    /// A with pod a relabelled, pod b gone, pod d new and the namespace as it was.
    const A2: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { team: a } }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: x, labels: { app: z } }
status: { podIP: 10.0.0.1 }
---
apiVersion: v1
kind: Pod
metadata: { name: d, namespace: x, labels: { app: d } }
status: { podIP: 10.0.0.4 }
"#;

    fn parse(name: &str, text: &str) -> Vec<Object> {
        parse_file(Path::new(name), text).unwrap()
    }

    fn debug(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| format!("{c:?}")).collect()
    }

    #[test]
    fn reassemble_changes_are_the_states_diff() {
        let (a, b) = (parse("a.yaml", A), parse("b.yaml", B));
        let mut state = assemble([a.as_slice(), b.as_slice()]).unwrap();
        let before = state.clone();
        let mut a2 = parse("a.yaml", A2);
        let changes =
            reassemble_changes(&mut state, &[a.as_slice()], &mut [a2.as_mut_slice()]).unwrap();
        let diff = diff_state(&before, &state);
        assert_eq!(debug(&changes), debug(&diff));
        // Pod a changed, b went, d came; the namespace kept its allocation.
        assert_eq!(changes.len(), 3, "{:?}", debug(&changes));
        assert!(
            matches!(&changes[1], Change::DeletePod(k) if k.name == "b"),
            "{:?}",
            debug(&changes)
        );
        let fresh = assemble([a2.as_slice(), b.as_slice()]).unwrap();
        assert!(state.same_content(&fresh));
        // The same files again: nothing changes.
        let mut again = parse("a.yaml", A2);
        let none =
            reassemble_changes(&mut state, &[a2.as_slice()], &mut [again.as_mut_slice()]).unwrap();
        assert!(none.is_empty(), "{:?}", debug(&none));
    }

    #[test]
    fn a_collision_leaves_the_state_untouched() {
        let (a, b) = (parse("a.yaml", A), parse("b.yaml", B));
        let mut state = assemble([a.as_slice(), b.as_slice()]).unwrap();
        let before = state.clone();
        // A now also declares pod c, which B still holds.
        let mut a2 = parse("a.yaml", &format!("{A2}---\n{B}"));
        assert!(
            reassemble_changes(&mut state, &[a.as_slice()], &mut [a2.as_mut_slice()]).is_none()
        );
        assert!(state.same_content(&before));
        assert_eq!(state.generation(), before.generation());
        assert!(state.pod(&ObjRef::new("x", "b")).is_some());
        // Two added files naming one object collide too.
        let (mut c1, mut c2) = (parse("c1.yaml", A2), parse("c2.yaml", A2));
        assert!(
            reassemble_changes(
                &mut state,
                &[a.as_slice()],
                &mut [c1.as_mut_slice(), c2.as_mut_slice()]
            )
            .is_none()
        );
        assert!(state.same_content(&before));
    }

    #[test]
    fn the_change_log_spans_the_generations_recorded() {
        let (a, b) = (parse("a.yaml", A), parse("b.yaml", B));
        let mut state = assemble([a.as_slice(), b.as_slice()]).unwrap();
        state.set_generation(1);
        assert!(state.changes_since(1).is_none(), "not tracked");
        state.track_changes();
        assert_eq!(state.changes_since(1).map(|c| c.len()), Some(0));
        let mut a2 = parse("a.yaml", A2);
        let c = reassemble_changes(&mut state, &[a.as_slice()], &mut [a2.as_mut_slice()]).unwrap();
        state.set_generation(2);
        state.record_changes(1, c);
        let mut a3 = parse("a.yaml", A);
        let c = reassemble_changes(&mut state, &[a2.as_slice()], &mut [a3.as_mut_slice()]).unwrap();
        state.set_generation(3);
        state.record_changes(2, c);
        assert_eq!(state.changes_since(2).map(|c| c.len()), Some(3));
        assert_eq!(state.changes_since(1).map(|c| c.len()), Some(6));
        assert!(
            state.changes_since(0).is_none(),
            "before the first recorded"
        );
        // A generation the log does not lead to (changed without recording) answers nothing.
        state.set_generation(4);
        assert!(state.changes_since(2).is_none());
        // A record not following the last one drops what it does not follow.
        state.set_generation(8);
        state.record_changes(7, Vec::new());
        assert!(state.changes_since(2).is_none());
        assert_eq!(state.changes_since(7).map(|c| c.len()), Some(0));
    }
}
