//! SCIM attribute paths (RFC 7644 §3.10) as used in mappings, and building resources from them.
//!
//! A mapping assigns values to paths such as `userName`, `name.givenName`,
//! `emails[type eq "work"].value` or
//! `urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value`. The extension
//! parses each path when it is configured ([`parse_path`]), so a typo is an error at `map()`
//! time; the worker later turns a flat `{path → value}` map into the nested resource a SCIM
//! service expects ([`build_resource`]).

use serde_json::{Map, Value};
use std::fmt;

/// The schema URN of the core User resource (RFC 7643 §4.1).
pub const CORE_USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";

/// Attributes the service provider assigns, which a mapping can never set.
const RESERVED: &[&str] = &["id", "meta", "schemas"];

/// A parsed attribute path: `[urn:]attr[\[filter\]][.sub]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttrPath {
    /// The schema URN for extension attributes (`urn:…:enterprise:2.0:User`); `None` for
    /// core attributes (a path prefixed with the core User URN is stored without it).
    pub urn: Option<String>,
    /// The attribute name (`emails`, `name`, `manager`).
    pub attr: String,
    /// The value filter selecting one element of a multi-valued attribute (`type eq "work"`).
    pub filter: Option<ValueFilter>,
    /// The sub-attribute (`givenName`, `value`).
    pub sub_attr: Option<String>,
}

/// A value filter `attr eq value` selecting one element of a multi-valued attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueFilter {
    /// The sub-attribute compared (`type`).
    pub attr: String,
    /// The value it must equal: a string, a boolean or a number.
    pub value: Value,
}

/// Why an attribute path was refused; messages are lower-case, for configuration-time errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty or only whitespace.
    #[error("attribute path is empty")]
    Empty,
    /// A name does not follow `ALPHA *(ALPHA / DIGIT / "-" / "_")`.
    #[error("invalid attribute name \"{name}\" in path \"{path}\"")]
    InvalidName {
        /// The offending name.
        name: String,
        /// The whole path.
        path: String,
    },
    /// The URN prefix is malformed.
    #[error("invalid schema urn \"{urn}\" in path \"{path}\"")]
    InvalidUrn {
        /// The offending URN.
        urn: String,
        /// The whole path.
        path: String,
    },
    /// The value filter is malformed or uses something other than `attr eq value`.
    #[error("invalid value filter in path \"{path}\": {reason}")]
    InvalidFilter {
        /// The whole path.
        path: String,
        /// What is wrong, e.g. `only "eq" is supported`.
        reason: String,
    },
    /// More than one level of sub-attributes, or text after the path.
    #[error("invalid attribute path \"{path}\": {reason}")]
    Malformed {
        /// The whole path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// `id`, `meta` or `schemas`.
    #[error("attribute \"{0}\" is assigned by the target and cannot be mapped")]
    Reserved(String),
    /// Two paths want to put incompatible values at one place of the resource.
    #[error("attribute paths \"{0}\" and \"{1}\" conflict")]
    Conflict(String, String),
}

/// `ALPHA *(ALPHA / DIGIT / "-" / "_")`, RFC 7644's ATTRNAME.
fn is_attr_name(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic())
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parses and validates an attribute path.
///
/// Accepted forms: `attr`, `attr.sub`, `attr[f eq v].sub`, each optionally prefixed with a
/// schema URN and a colon. Filters support only `eq` with a string (`"work"`, JSON escapes
/// allowed), boolean or number; a filtered path must name a sub-attribute, because a mapping
/// assigns one value. The core User URN prefix is accepted and dropped.
pub fn parse_path(input: &str) -> Result<AttrPath, PathError> {
    let path = input.trim();
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    let malformed = |reason: &str| PathError::Malformed {
        path: path.to_string(),
        reason: reason.to_string(),
    };

    // The URN ends at the last ':' before any filter: filter values may contain colons.
    let head_end = path.find('[').unwrap_or(path.len());
    let (urn, rest) = if path[..4.min(path.len())].eq_ignore_ascii_case("urn:") {
        match path[..head_end].rfind(':') {
            Some(pos) if pos > 3 => (Some(&path[..pos]), &path[pos + 1..]),
            _ => {
                return Err(PathError::InvalidUrn {
                    urn: path.to_string(),
                    path: path.to_string(),
                })
            }
        }
    } else {
        (None, path)
    };
    if let Some(u) = urn {
        let ok = u.split(':').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        });
        if !ok {
            return Err(PathError::InvalidUrn {
                urn: u.to_string(),
                path: path.to_string(),
            });
        }
    }

    // attr
    let attr_end = rest.find(['[', '.']).unwrap_or(rest.len());
    let attr = &rest[..attr_end];
    if !is_attr_name(attr) {
        return Err(PathError::InvalidName {
            name: attr.to_string(),
            path: path.to_string(),
        });
    }
    let mut tail = &rest[attr_end..];

    // [filter]
    let mut filter = None;
    if let Some(after) = tail.strip_prefix('[') {
        let close = find_filter_end(after).ok_or_else(|| PathError::InvalidFilter {
            path: path.to_string(),
            reason: "missing \"]\"".to_string(),
        })?;
        filter = Some(parse_filter(&after[..close], path)?);
        tail = &after[close + 1..];
    }

    // .sub
    let mut sub_attr = None;
    if let Some(sub) = tail.strip_prefix('.') {
        if sub.contains('.') || sub.contains('[') {
            return Err(malformed("only one level of sub-attributes is allowed"));
        }
        if !is_attr_name(sub) {
            return Err(PathError::InvalidName {
                name: sub.to_string(),
                path: path.to_string(),
            });
        }
        sub_attr = Some(sub.to_string());
    } else if !tail.is_empty() {
        return Err(malformed(&format!("unexpected \"{tail}\"")));
    }
    if filter.is_some() && sub_attr.is_none() {
        return Err(malformed(
            "a filtered path must name a sub-attribute, e.g. emails[type eq \"work\"].value",
        ));
    }

    let urn = urn.filter(|u| !u.eq_ignore_ascii_case(CORE_USER_SCHEMA));
    if urn.is_none() && RESERVED.iter().any(|r| r.eq_ignore_ascii_case(attr)) {
        return Err(PathError::Reserved(attr.to_string()));
    }
    Ok(AttrPath {
        urn: urn.map(str::to_string),
        attr: attr.to_string(),
        filter,
        sub_attr,
    })
}

/// Index of the `]` closing a filter, skipping brackets inside quoted strings.
fn find_filter_end(s: &str) -> Option<usize> {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (false, _, '"') => in_string = true,
            (false, _, ']') => return Some(i),
            _ => {}
        }
    }
    None
}

/// Parses `attr eq value`.
fn parse_filter(s: &str, path: &str) -> Result<ValueFilter, PathError> {
    let bad = |reason: &str| PathError::InvalidFilter {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let s = s.trim();
    let (attr, rest) = s
        .split_once(char::is_whitespace)
        .ok_or_else(|| bad("expected `attribute eq value`"))?;
    let rest = rest.trim_start();
    let (op, value) = rest
        .split_once(char::is_whitespace)
        .ok_or_else(|| bad("expected `attribute eq value`"))?;
    if !is_attr_name(attr) {
        return Err(bad(&format!("invalid attribute name \"{attr}\"")));
    }
    if !op.eq_ignore_ascii_case("eq") {
        return Err(bad(&format!(
            "operator \"{op}\" is not supported, only \"eq\" selects one element"
        )));
    }
    let value = value.trim();
    let parsed: Value = serde_json::from_str(value).map_err(|_| {
        bad(&format!(
            "value {value} is not a quoted string, a boolean or a number"
        ))
    })?;
    if !(parsed.is_string() || parsed.is_boolean() || parsed.is_number()) {
        return Err(bad(&format!(
            "value {value} is not a quoted string, a boolean or a number"
        )));
    }
    Ok(ValueFilter {
        attr: attr.to_string(),
        value: parsed,
    })
}

impl fmt::Display for ValueFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // serde_json's string encoding escapes `"` and `\` as RFC 7644 requires.
        write!(f, "{} eq {}", self.attr, self.value)
    }
}

impl fmt::Display for AttrPath {
    /// The canonical path text, as sent in PATCH operations.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.element_path())?;
        if let Some(sub) = &self.sub_attr {
            write!(f, ".{sub}")?;
        }
        Ok(())
    }
}

impl AttrPath {
    /// The path without its sub-attribute: `emails[type eq "work"]`, `name`, `urn:…:manager`.
    pub fn element_path(&self) -> String {
        let mut s = String::new();
        if let Some(u) = &self.urn {
            s.push_str(u);
            s.push(':');
        }
        s.push_str(&self.attr);
        if let Some(f) = &self.filter {
            s.push('[');
            s.push_str(&f.to_string());
            s.push(']');
        }
        s
    }

    /// A SCIM filter expression (RFC 7644 §3.4.2.2) matching resources whose value at this
    /// path equals `value`: `userName eq "x"`, `emails[type eq "work" and value eq "x"]`.
    pub fn filter_expr(&self, value: &Value) -> String {
        match (&self.filter, &self.sub_attr) {
            (Some(f), Some(sub)) => {
                let mut s = String::new();
                if let Some(u) = &self.urn {
                    s.push_str(u);
                    s.push(':');
                }
                format!(
                    "{s}{}[{f} and {sub} eq {}]",
                    self.attr,
                    filter_literal(value)
                )
            }
            _ => format!("{self} eq {}", filter_literal(value)),
        }
    }

    /// Reads this path's value from a nested resource, if present and not null.
    pub fn get<'a>(&self, resource: &'a Value) -> Option<&'a Value> {
        let container = match &self.urn {
            Some(u) => get_ci(resource.as_object()?, u)?,
            None => resource,
        };
        let v = get_ci(container.as_object()?, &self.attr)?;
        let v = match &self.filter {
            Some(f) => v.as_array()?.iter().find(|e| f.matches(e))?,
            None => v,
        };
        let v = match &self.sub_attr {
            Some(sub) => get_ci(v.as_object()?, sub)?,
            None => v,
        };
        (!v.is_null()).then_some(v)
    }

    /// Whether the element a filtered path selects exists in `resource` (always true for
    /// paths without a filter, which need no element).
    pub fn element_exists(&self, resource: &Value) -> bool {
        let Some(f) = &self.filter else { return true };
        let container = match &self.urn {
            Some(u) => resource.as_object().and_then(|o| get_ci(o, u)),
            None => Some(resource),
        };
        container
            .and_then(|c| c.as_object())
            .and_then(|o| get_ci(o, &self.attr))
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().any(|e| f.matches(e)))
    }
}

impl ValueFilter {
    /// Whether a multi-valued attribute's element matches; strings compare case-insensitively
    /// (RFC 7643 §2.2: `caseExact` is false for `type`-like attributes).
    pub fn matches(&self, element: &Value) -> bool {
        let Some(v) = element.as_object().and_then(|o| get_ci(o, &self.attr)) else {
            return false;
        };
        match (v, &self.value) {
            (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        }
    }
}

/// A value rendered as a filter literal: strings quoted with `"` and `\` escaped (RFC 7644).
pub fn filter_literal(value: &Value) -> String {
    match value {
        Value::String(_) | Value::Bool(_) | Value::Number(_) | Value::Null => value.to_string(),
        // A filter cannot compare objects; their JSON text as a string at least stays valid.
        other => Value::String(other.to_string()).to_string(),
    }
}

/// Case-insensitive key lookup: SCIM attribute names are case-insensitive (RFC 7643 §2.1).
fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The existing key matching `key` case-insensitively, or `key` itself.
fn key_ci(map: &Map<String, Value>, key: &str) -> String {
    if map.contains_key(key) {
        return key.to_string();
    }
    map.keys()
        .find(|k| k.eq_ignore_ascii_case(key))
        .cloned()
        .unwrap_or_else(|| key.to_string())
}

/// Builds the nested SCIM resource from a flat `{path → value}` map.
///
/// `name.givenName` becomes `{"name": {"givenName": …}}`; `emails[type eq "work"].value`
/// becomes an element `{"type": "work", "value": …}` of the `emails` array, and paths that
/// select the same element merge into it; URN-prefixed paths go under their URN key. Null
/// values are omitted (and an element whose values are all null is not created). The
/// `schemas` array is not added: see [`schemas_for`].
pub fn build_resource(flat: &Map<String, Value>) -> Result<Value, PathError> {
    let mut root = Map::new();
    // Which path set each top-level place, to name both sides of a conflict.
    let mut owners: Vec<(String, String)> = Vec::new();
    for (raw, value) in flat {
        if value.is_null() {
            continue;
        }
        let p = parse_path(raw)?;
        let conflict = |owners: &Vec<(String, String)>, place: &str| {
            let other = owners
                .iter()
                .find(|(pl, _)| pl.eq_ignore_ascii_case(place))
                .map_or_else(String::new, |(_, o)| o.clone());
            PathError::Conflict(other, raw.clone())
        };
        let container: &mut Map<String, Value> = match &p.urn {
            Some(u) => {
                let k = key_ci(&root, u);
                let slot = root.entry(k).or_insert_with(|| Value::Object(Map::new()));
                match slot.as_object_mut() {
                    Some(m) => m,
                    None => return Err(conflict(&owners, u)),
                }
            }
            None => &mut root,
        };
        let place = p.element_path();
        let key = key_ci(container, &p.attr);
        match (&p.filter, &p.sub_attr) {
            (None, None) => {
                if container.contains_key(&key) {
                    return Err(conflict(&owners, &p.attr));
                }
                container.insert(key, value.clone());
            }
            (None, Some(sub)) => {
                let slot = container
                    .entry(key)
                    .or_insert_with(|| Value::Object(Map::new()));
                let Some(obj) = slot.as_object_mut() else {
                    return Err(conflict(&owners, &p.attr));
                };
                let sk = key_ci(obj, sub);
                if obj.contains_key(&sk) {
                    return Err(conflict(&owners, &p.to_string()));
                }
                obj.insert(sk, value.clone());
            }
            (Some(f), Some(sub)) => {
                let slot = container
                    .entry(key)
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Some(arr) = slot.as_array_mut() else {
                    return Err(conflict(&owners, &p.attr));
                };
                let idx = match arr.iter().position(|e| f.matches(e)) {
                    Some(i) => i,
                    None => {
                        let mut el = Map::new();
                        el.insert(f.attr.clone(), f.value.clone());
                        arr.push(Value::Object(el));
                        arr.len() - 1
                    }
                };
                if let Some(el) = arr.get_mut(idx).and_then(Value::as_object_mut) {
                    let sk = key_ci(el, sub);
                    if el.contains_key(&sk) && !sub.eq_ignore_ascii_case(&f.attr) {
                        return Err(conflict(&owners, &p.to_string()));
                    }
                    el.insert(sk, value.clone());
                }
            }
            // parse_path refuses a filter without a sub-attribute.
            (Some(_), None) => {
                return Err(PathError::Malformed {
                    path: raw.clone(),
                    reason: "a filtered path must name a sub-attribute".to_string(),
                })
            }
        }
        owners.push((p.attr.clone(), raw.clone()));
        owners.push((place, raw.clone()));
        if let Some(u) = &p.urn {
            owners.push((u.clone(), raw.clone()));
        }
    }
    Ok(Value::Object(root))
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

fn empty_array() -> Value {
    Value::Array(Vec::new())
}

/// The value under `key` as a `T` (`kind` is `Value::as_object_mut` or `Value::as_array_mut`),
/// made `empty()` first when it is missing or of another kind.
fn slot_of<T>(
    container: &mut Map<String, Value>,
    key: String,
    empty: fn() -> Value,
    kind: fn(&mut Value) -> Option<&mut T>,
) -> Option<&mut T> {
    let slot = container.entry(key).or_insert_with(empty);
    if kind(slot).is_none() {
        *slot = empty();
    }
    kind(slot)
}

/// Applies flat changes to a nested resource in place (null removes), for services without
/// PATCH, which get the whole resource back with PUT.
///
/// A filtered path's element is created when missing and removed when only its filter
/// attribute would be left; an emptied complex attribute is removed. Extension URNs that gain
/// values are added to the resource's `schemas`.
pub fn apply_changes(resource: &mut Value, changes: &Map<String, Value>) -> Result<(), PathError> {
    if !resource.is_object() {
        *resource = Value::Object(Map::new());
    }
    for (raw, value) in changes {
        let p = parse_path(raw)?;
        let Some(root) = resource.as_object_mut() else {
            continue;
        };
        let container = match &p.urn {
            Some(u) => {
                let k = key_ci(root, u);
                match slot_of(root, k, empty_object, Value::as_object_mut) {
                    Some(m) => m,
                    None => continue,
                }
            }
            None => root,
        };
        let key = key_ci(container, &p.attr);
        match (&p.filter, &p.sub_attr) {
            (None, None) => {
                if value.is_null() {
                    container.remove(&key);
                } else {
                    container.insert(key, value.clone());
                }
            }
            (None, Some(sub)) => {
                if value.is_null() {
                    if let Some(obj) = container.get_mut(&key).and_then(Value::as_object_mut) {
                        let sk = key_ci(obj, sub);
                        obj.remove(&sk);
                        if obj.is_empty() {
                            container.remove(&key);
                        }
                    }
                } else if let Some(obj) =
                    slot_of(container, key, empty_object, Value::as_object_mut)
                {
                    let sk = key_ci(obj, sub);
                    obj.insert(sk, value.clone());
                }
            }
            (Some(f), Some(sub)) => {
                if value.is_null() {
                    if let Some(arr) = container.get_mut(&key).and_then(Value::as_array_mut) {
                        if let Some(el) = arr.iter_mut().find(|e| f.matches(e)) {
                            if let Some(obj) = el.as_object_mut() {
                                let sk = key_ci(obj, sub);
                                obj.remove(&sk);
                            }
                        }
                        // An element left with only its filter attribute carries nothing.
                        arr.retain(|e| {
                            !(f.matches(e) && e.as_object().is_some_and(|o| o.len() <= 1))
                        });
                        if arr.is_empty() {
                            container.remove(&key);
                        }
                    }
                } else if let Some(arr) = slot_of(container, key, empty_array, Value::as_array_mut)
                {
                    if !arr.iter().any(|e| f.matches(e)) {
                        let mut el = Map::new();
                        el.insert(f.attr.clone(), f.value.clone());
                        arr.push(Value::Object(el));
                    }
                    if let Some(obj) = arr
                        .iter_mut()
                        .find(|e| f.matches(e))
                        .and_then(Value::as_object_mut)
                    {
                        let sk = key_ci(obj, sub);
                        obj.insert(sk, value.clone());
                    }
                }
            }
            (Some(_), None) => {}
        }
    }
    // Keep `schemas` in step with the extensions the resource now uses.
    if let Some(root) = resource.as_object_mut() {
        let mut schemas: Vec<Value> = root
            .get("schemas")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(|| vec![Value::String(CORE_USER_SCHEMA.to_string())]);
        for urn in schemas_for(changes)? {
            let has = schemas
                .iter()
                .any(|s| s.as_str().is_some_and(|s| s.eq_ignore_ascii_case(&urn)));
            if !has && root.contains_key(&urn) {
                schemas.push(Value::String(urn));
            }
        }
        root.insert("schemas".to_string(), Value::Array(schemas));
    }
    Ok(())
}

/// The `schemas` array for a User resource built from `flat`: the core User schema, then each
/// extension URN that has a non-null value, in the map's (sorted) key order.
pub fn schemas_for(flat: &Map<String, Value>) -> Result<Vec<String>, PathError> {
    let mut out = vec![CORE_USER_SCHEMA.to_string()];
    for (raw, value) in flat {
        if value.is_null() {
            continue;
        }
        if let Some(u) = parse_path(raw)?.urn {
            if !out.iter().any(|s| s.eq_ignore_ascii_case(&u)) {
                out.push(u);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

    fn flat(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn parses_the_documented_forms() {
        let p = parse_path("userName").unwrap();
        assert_eq!(
            (p.attr.as_str(), p.urn, p.filter, p.sub_attr),
            ("userName", None, None, None)
        );
        let p = parse_path("name.givenName").unwrap();
        assert_eq!(p.sub_attr.as_deref(), Some("givenName"));
        let p = parse_path(r#"emails[type eq "work"].value"#).unwrap();
        assert_eq!(
            p.filter,
            Some(ValueFilter {
                attr: "type".into(),
                value: json!("work")
            })
        );
        assert_eq!(p.to_string(), r#"emails[type eq "work"].value"#);
        let p = parse_path(&format!("{ENT}:department")).unwrap();
        assert_eq!(
            (p.urn.as_deref(), p.attr.as_str()),
            (Some(ENT), "department")
        );
        let p = parse_path(&format!("{ENT}:manager.value")).unwrap();
        assert_eq!(p.sub_attr.as_deref(), Some("value"));
        assert_eq!(p.to_string(), format!("{ENT}:manager.value"));
        let p = parse_path(&format!("{CORE_USER_SCHEMA}:userName")).unwrap();
        assert_eq!((p.urn, p.attr.as_str()), (None, "userName"));
        let p = parse_path(r#"addresses[type eq "a:b]c"].locality"#).unwrap();
        assert_eq!(p.filter.unwrap().value, json!("a:b]c"));
        let p = parse_path("phoneNumbers[primary eq true].value").unwrap();
        assert_eq!(p.filter.unwrap().value, json!(true));
    }

    #[test]
    fn refuses_bad_paths_with_clear_errors() {
        let cases = [
            ("", "attribute path is empty"),
            ("1abc", "invalid attribute name \"1abc\" in path \"1abc\""),
            ("name.", "invalid attribute name \"\" in path \"name.\""),
            (
                "name.given.x",
                "only one level of sub-attributes is allowed",
            ),
            ("emails[type eq \"work\"", "missing \"]\""),
            (
                "emails[type co \"w\"].value",
                "operator \"co\" is not supported",
            ),
            ("emails[type eq work].value", "is not a quoted string"),
            ("emails[type eq \"w\"]", "must name a sub-attribute"),
            ("emails[type eq \"w\"]x", "unexpected \"x\""),
            (
                "id",
                "attribute \"id\" is assigned by the target and cannot be mapped",
            ),
            ("urn:", "invalid schema urn"),
            ("urn:a::b:attr", "invalid schema urn \"urn:a::b\""),
            ("user name", "invalid attribute name"),
        ];
        for (input, want) in cases {
            let err = parse_path(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn builds_nested_resources() {
        let r = build_resource(&flat(json!({
            "userName": "zoe",
            "name.givenName": "Zoë",
            "name.familyName": "Berg",
            "emails[type eq \"work\"].value": "z@x.org",
            "emails[type eq \"work\"].primary": true,
            "emails[type eq \"home\"].value": "z@home.org",
            "phoneNumbers[type eq \"work\"].value": null,
            format!("{ENT}:department"): "IT",
            format!("{ENT}:manager.value"): "42",
            "title": null,
            "active": false,
        })))
        .unwrap();
        assert_eq!(
            r,
            json!({
                "userName": "zoe",
                "name": {"givenName": "Zoë", "familyName": "Berg"},
                // serde_json's map is ordered by key, so elements follow path order.
                "emails": [
                    {"type": "home", "value": "z@home.org"},
                    {"type": "work", "value": "z@x.org", "primary": true}
                ],
                ENT: {"department": "IT", "manager": {"value": "42"}},
                "active": false,
            })
        );
    }

    #[test]
    fn schemas_list_used_extensions() {
        let f = flat(json!({
            "userName": "a",
            format!("{ENT}:department"): "IT",
            format!("{ENT}:manager.value"): "1",
            "urn:example:ext:1.0:User:x": null,
        }));
        assert_eq!(
            schemas_for(&f).unwrap(),
            vec![CORE_USER_SCHEMA.to_string(), ENT.to_string()]
        );
    }

    #[test]
    fn conflicts_are_errors() {
        let err = build_resource(&flat(json!({"name": "x", "name.givenName": "y"}))).unwrap_err();
        assert!(matches!(err, PathError::Conflict(..)), "{err}");
        let err = build_resource(&flat(json!({"userName": "x", "USERNAME": "y"}))).unwrap_err();
        assert!(matches!(err, PathError::Conflict(..)), "{err}");
    }

    #[test]
    fn applies_changes_in_place() {
        let mut r = json!({
            "schemas": [CORE_USER_SCHEMA],
            "id": "1",
            "userName": "zoe",
            "title": "x",
            "name": {"givenName": "Z"},
            "emails": [{"type": "work", "value": "w@x"}, {"type": "home", "value": "h@x"}],
        });
        apply_changes(
            &mut r,
            &flat(json!({
                "title": null,
                "name.givenName": null,
                "emails[type eq \"home\"].value": null,
                "emails[type eq \"work\"].value": "new@x",
                "emails[type eq \"other\"].value": "o@x",
                format!("{ENT}:department"): "IT",
                "active": false,
            })),
        )
        .unwrap();
        assert_eq!(
            r,
            json!({
                "schemas": [CORE_USER_SCHEMA, ENT],
                "id": "1",
                "userName": "zoe",
                "emails": [{"type": "work", "value": "new@x"}, {"type": "other", "value": "o@x"}],
                ENT: {"department": "IT"},
                "active": false,
            })
        );
    }

    #[test]
    fn filters_escape_and_read_back() {
        let p = parse_path("userName").unwrap();
        assert_eq!(p.filter_expr(&json!("a\"b\\c")), r#"userName eq "a\"b\\c""#);
        let p = parse_path(r#"emails[type eq "work"].value"#).unwrap();
        assert_eq!(
            p.filter_expr(&json!("z@x.org")),
            r#"emails[type eq "work" and value eq "z@x.org"]"#
        );
        let res = json!({"emails": [{"type": "Work", "value": "v"}]});
        assert_eq!(p.get(&res), Some(&json!("v")));
        assert!(p.element_exists(&res));
        assert!(!parse_path(r#"emails[type eq "home"].value"#)
            .unwrap()
            .element_exists(&res));
    }
}
