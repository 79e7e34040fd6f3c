//! The sink's SCIM store: the users and groups it was sent, so that a reconciliation can page
//! through them with `GET /Users?startIndex=&count=` as it would on a real service.
//!
//! Small on purpose: attribute paths `[urn:]attr[\[filter\]][.sub]` with `eq` value filters
//! joined by `and`, PATCH `add`/`replace`/`remove` (RFC 7644 §3.5.2), `attributes=` /
//! `excludedAttributes=` projection (§3.4.2.5) and `eq` search filters (§3.4.2.2, joined by
//! `and`). Attribute names compare case-insensitively, as SCIM's do.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// Resources in insertion order with an index by id. A delete moves the last resource into
/// the hole, so a page boundary may shift under a scan in progress, as on real services.
#[derive(Default)]
pub struct Store {
    items: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Store {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.index.clear();
    }

    /// Stores (or replaces) the resource with this id.
    pub fn put(&mut self, id: String, resource: Value) {
        match self.index.get(&id) {
            Some(&i) => self.items[i].1 = resource,
            None => {
                self.index.insert(id.clone(), self.items.len());
                self.items.push((id, resource));
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&Value> {
        self.index.get(id).map(|&i| &self.items[i].1)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.index.get(id).map(|&i| &mut self.items[i].1)
    }

    pub fn remove(&mut self, id: &str) -> bool {
        let Some(i) = self.index.remove(id) else {
            return false;
        };
        self.items.swap_remove(i);
        if let Some((moved, _)) = self.items.get(i) {
            self.index.insert(moved.clone(), i);
        }
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = &Value> {
        self.items.iter().map(|(_, v)| v)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Value> {
        self.items.iter_mut().map(|(_, v)| v)
    }

    /// Resources `start_index ..` (1-based), at most `count`.
    pub fn page(&self, start_index: usize, count: usize) -> impl Iterator<Item = &Value> {
        self.items
            .iter()
            .skip(start_index.max(1) - 1)
            .take(count)
            .map(|(_, v)| v)
    }
}

// --- query strings -----------------------------------------------------------------------------

/// A query value: `%XX` and `+` decoded; invalid escapes are kept as they are.
pub fn pct_decode(s: &str) -> String {
    decode(s, true)
}

/// A path segment: `%XX` decoded, `+` kept.
pub fn pct_decode_path(s: &str) -> String {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded value of query parameter `name` (case-insensitive name).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        k.eq_ignore_ascii_case(name).then(|| pct_decode(v))
    })
}

// --- objects with case-insensitive keys -------------------------------------------------------

fn key_ci(map: &Map<String, Value>, key: &str) -> Option<String> {
    if map.contains_key(key) {
        return Some(key.to_string());
    }
    map.keys().find(|k| k.eq_ignore_ascii_case(key)).cloned()
}

fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn get_ci_mut<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Value> {
    let k = key_ci(map, key)?;
    map.get_mut(&k)
}

fn set_ci(map: &mut Map<String, Value>, key: &str, value: Value) {
    let k = key_ci(map, key).unwrap_or_else(|| key.to_string());
    map.insert(k, value);
}

fn remove_ci(map: &mut Map<String, Value>, key: &str) {
    if let Some(k) = key_ci(map, key) {
        map.remove(&k);
    }
}

/// The object at `key`, created (or made an object) if needed.
fn object_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let k = key_ci(map, key).unwrap_or_else(|| key.to_string());
    let slot = map.entry(k).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

// --- attribute paths ----------------------------------------------------------------------------

const CORE_SCHEMAS: &[&str] = &[
    "urn:ietf:params:scim:schemas:core:2.0:User",
    "urn:ietf:params:scim:schemas:core:2.0:Group",
];

/// `[urn:]attr[\[filter\]][.sub]`
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub urn: Option<String>,
    pub attr: String,
    /// `sub eq value` conjuncts selecting elements of a multi-valued attribute.
    pub filter: Option<Vec<(String, Value)>>,
    pub sub: Option<String>,
}

/// Whether `s` names a schema rather than an attribute: `urn:…:User`, `urn:…:Group`,
/// `urn:…:EnterpriseUser` (schema names are capitalised, attribute names are not).
fn is_schema_urn(s: &str) -> bool {
    s.len() > 4
        && s[..4].eq_ignore_ascii_case("urn:")
        && s.rsplit(':')
            .next()
            .and_then(|last| last.chars().next())
            .is_some_and(|c| c.is_ascii_uppercase())
}

pub fn parse_path(input: &str) -> Option<Path> {
    let path = input.trim();
    if path.is_empty() {
        return None;
    }
    let head_end = path.find('[').unwrap_or(path.len());
    let (urn, rest) = if path.len() > 4 && path[..4].eq_ignore_ascii_case("urn:") {
        let pos = path[..head_end].rfind(':')?;
        let urn = &path[..pos];
        let core = CORE_SCHEMAS.iter().any(|c| c.eq_ignore_ascii_case(urn));
        ((!core).then(|| urn.to_string()), &path[pos + 1..])
    } else {
        (None, path)
    };
    let name_end = rest.find(['[', '.']).unwrap_or(rest.len());
    let attr = rest[..name_end].to_string();
    if attr.is_empty() {
        return None;
    }
    let mut tail = &rest[name_end..];
    let mut filter = None;
    if tail.starts_with('[') {
        let close = closing_bracket(tail)?;
        let mut p = Parser::new(&tail[1..close]);
        filter = Some(p.conjuncts()?);
        if !p.at_end() {
            return None;
        }
        tail = &tail[close + 1..];
    }
    let sub = match tail.strip_prefix('.') {
        Some(s) if !s.is_empty() && !s.contains(['.', '[']) => Some(s.to_string()),
        Some(_) => return None,
        None if tail.is_empty() => None,
        None => return None,
    };
    Some(Path {
        urn,
        attr,
        filter,
        sub,
    })
}

/// The index of the `]` closing the `[` at 0, skipping quoted strings.
fn closing_bracket(s: &str) -> Option<usize> {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
        } else if c == '"' {
            in_str = true;
        } else if c == ']' {
            return Some(i);
        }
    }
    None
}

fn str_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.eq_ignore_ascii_case(y),
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn element_matches(element: &Value, conjuncts: &[(String, Value)]) -> bool {
    let Some(o) = element.as_object() else {
        return false;
    };
    conjuncts
        .iter()
        .all(|(k, want)| get_ci(o, k).is_some_and(|v| str_eq(v, want)))
}

impl Path {
    fn container<'a>(&self, res: &'a Value) -> Option<&'a Map<String, Value>> {
        let root = res.as_object()?;
        match &self.urn {
            Some(u) => get_ci(root, u)?.as_object(),
            None => Some(root),
        }
    }

    /// Every value this path selects (elements of multi-valued attributes are flattened).
    fn values<'a>(&self, res: &'a Value) -> Vec<&'a Value> {
        let Some(v) = self.container(res).and_then(|c| get_ci(c, &self.attr)) else {
            return Vec::new();
        };
        let elements: Vec<&Value> = match (v, &self.filter) {
            (Value::Array(a), Some(f)) => a.iter().filter(|e| element_matches(e, f)).collect(),
            (_, Some(_)) => Vec::new(),
            (Value::Array(a), None) => a.iter().collect(),
            (v, None) => vec![v],
        };
        match &self.sub {
            Some(sub) => elements
                .into_iter()
                .filter_map(|e| e.as_object().and_then(|o| get_ci(o, sub)))
                .collect(),
            None => elements,
        }
    }
}

// --- search filters -----------------------------------------------------------------------------

/// One term of a search filter.
#[derive(Debug)]
pub enum Term {
    /// `path eq literal`
    Eq(Path, Value),
    /// `attr[sub eq v and …]`: some element matches.
    Has(Path),
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str) -> Self {
        Parser { s, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let r = self.rest();
        self.pos += r.len() - r.trim_start().len();
    }

    fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos >= self.s.len()
    }

    fn keyword(&mut self, kw: &str) -> bool {
        self.skip_ws();
        let r = self.rest();
        let ok = r.len() > kw.len()
            && r[..kw.len()].eq_ignore_ascii_case(kw)
            && r[kw.len()..].starts_with([' ', '\t', '"', '(']);
        if ok {
            self.pos += kw.len();
        }
        ok
    }

    /// An attribute path, including a bracketed value filter.
    fn path_text(&mut self) -> Option<&'a str> {
        self.skip_ws();
        let start = self.pos;
        let r = self.rest();
        let mut end = 0;
        let bytes = r.as_bytes();
        while end < bytes.len() {
            match bytes[end] {
                b'[' => end += closing_bracket(&r[end..])? + 1,
                b' ' | b'\t' | b'(' | b')' => break,
                _ => end += 1,
            }
        }
        if end == 0 {
            return None;
        }
        self.pos = start + end;
        Some(&r[..end])
    }

    fn literal(&mut self) -> Option<Value> {
        self.skip_ws();
        let r = self.rest();
        if r.starts_with('"') {
            let mut escaped = false;
            for (i, c) in r.char_indices().skip(1) {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        let v = serde_json::from_str(&r[..=i]).ok()?;
                        self.pos += i + 1;
                        return Some(v);
                    }
                    _ => {}
                }
            }
            return None;
        }
        let end = r.find([' ', '\t', ']', ')']).unwrap_or(r.len());
        let v: Value = serde_json::from_str(&r[..end]).ok()?;
        if v.is_object() || v.is_array() {
            return None;
        }
        self.pos += end;
        Some(v)
    }

    /// `name eq literal (and name eq literal)*` inside a value filter.
    fn conjuncts(&mut self) -> Option<Vec<(String, Value)>> {
        let mut out = Vec::new();
        loop {
            let name = self.path_text()?.to_string();
            if !self.keyword("eq") {
                return None;
            }
            out.push((name, self.literal()?));
            if !self.keyword("and") {
                return Some(out);
            }
        }
    }
}

/// Parses `term (and term)*` where a term is `path eq literal` or `attr[…]`; anything else
/// (`or`, `not`, parentheses, other operators) is refused.
pub fn parse_filter(text: &str) -> Option<Vec<Term>> {
    let mut p = Parser::new(text);
    let mut terms = Vec::new();
    loop {
        let path = parse_path(p.path_text()?)?;
        if path.filter.is_some() && path.sub.is_none() && (p.at_end() || p.keyword("and")) {
            terms.push(Term::Has(path));
            if p.at_end() {
                return Some(terms);
            }
            continue;
        }
        if !p.keyword("eq") {
            return None;
        }
        terms.push(Term::Eq(path, p.literal()?));
        if p.at_end() {
            return Some(terms);
        }
        if !p.keyword("and") {
            return None;
        }
    }
}

pub fn matches(res: &Value, terms: &[Term]) -> bool {
    terms.iter().all(|t| match t {
        Term::Eq(path, want) => {
            let exact = path.sub.is_none()
                && (path.attr.eq_ignore_ascii_case("externalId")
                    || path.attr.eq_ignore_ascii_case("id"));
            path.values(res)
                .into_iter()
                .any(|v| if exact { v == want } else { str_eq(v, want) })
        }
        Term::Has(path) => !path.values(res).is_empty(),
    })
}

// --- projection ---------------------------------------------------------------------------------

/// The resource with only `id`, `schemas` and the listed attributes (`attributes=`), or without
/// the listed ones (`excludedAttributes=`).
pub fn project(res: &Value, attributes: Option<&str>, excluded: Option<&str>) -> Value {
    let Some(root) = res.as_object() else {
        return res.clone();
    };
    if let Some(list) = attributes.filter(|l| !l.trim().is_empty()) {
        let mut out = Map::new();
        for k in ["schemas", "id"] {
            if let Some(v) = root.get(k) {
                out.insert(k.to_string(), v.clone());
            }
        }
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            copy_attr(root, &mut out, name);
        }
        return Value::Object(out);
    }
    if let Some(list) = excluded {
        let mut out = root.clone();
        for name in list.split(',').map(str::trim) {
            if name.eq_ignore_ascii_case("id") || name.eq_ignore_ascii_case("schemas") {
                continue;
            }
            match parse_path(name) {
                Some(p) if p.urn.is_none() && p.sub.is_none() => remove_ci(&mut out, &p.attr),
                Some(p) if p.urn.is_none() => {
                    if let Some(Value::Object(o)) = get_ci_mut(&mut out, &p.attr) {
                        remove_ci(o, p.sub.as_deref().unwrap_or(""));
                    }
                }
                Some(p) => {
                    if let Some(Value::Object(o)) = get_ci_mut(&mut out, p.urn.as_deref().unwrap_or(""))
                    {
                        remove_ci(o, &p.attr);
                    }
                }
                None => {}
            }
        }
        return Value::Object(out);
    }
    res.clone()
}

fn copy_attr(root: &Map<String, Value>, out: &mut Map<String, Value>, name: &str) {
    // A whole extension (`urn:…:enterprise:2.0:User`) or a top-level attribute.
    if let Some(v) = get_ci(root, name) {
        let k = key_ci(root, name).unwrap_or_else(|| name.to_string());
        out.insert(k, v.clone());
        return;
    }
    let Some(p) = parse_path(name) else { return };
    let src = match &p.urn {
        Some(u) => match get_ci(root, u).and_then(Value::as_object) {
            Some(o) => o,
            None => return,
        },
        None => root,
    };
    let Some(v) = get_ci(src, &p.attr) else { return };
    let picked = match &p.sub {
        None => v.clone(),
        Some(sub) => match v {
            Value::Object(o) => match get_ci(o, sub) {
                Some(sv) => {
                    let mut m = Map::new();
                    m.insert(sub.clone(), sv.clone());
                    Value::Object(m)
                }
                None => return,
            },
            Value::Array(a) => Value::Array(
                a.iter()
                    .filter_map(|e| {
                        let sv = e.as_object().and_then(|o| get_ci(o, sub))?;
                        let mut m = Map::new();
                        m.insert(sub.clone(), sv.clone());
                        Some(Value::Object(m))
                    })
                    .collect(),
            ),
            _ => return,
        },
    };
    let dst = match &p.urn {
        Some(u) => object_at(out, u),
        None => out,
    };
    match (get_ci_mut(dst, &p.attr), picked) {
        // Two sub-attributes of one complex attribute: merge them.
        (Some(Value::Object(have)), Value::Object(more)) => have.extend(more),
        (_, picked) => set_ci(dst, &p.attr, picked),
    }
}

// --- PATCH (RFC 7644 §3.5.2) --------------------------------------------------------------------

/// Why a PATCH operation was refused: the `scimType` of the 400 answer.
pub type PatchError = &'static str;

/// Applies a PatchOp body to a resource; `id` and `schemas` are kept.
pub fn apply_patch(res: &mut Value, body: &Value) -> Result<(), PatchError> {
    let ops = body
        .get("Operations")
        .or_else(|| body.get("operations"))
        .and_then(Value::as_array)
        .ok_or("invalidSyntax")?;
    let Some(root) = res.as_object_mut() else {
        return Err("invalidSyntax");
    };
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("invalidSyntax")?
            .to_ascii_lowercase();
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match op.get("path").and_then(Value::as_str) {
            Some(text) => {
                let path = parse_path(text).ok_or("invalidPath")?;
                apply_op(root, &kind, &path, value)?;
            }
            None => {
                if kind == "remove" {
                    return Err("noTarget");
                }
                let Value::Object(values) = value else {
                    return Err("invalidValue");
                };
                for (k, v) in values {
                    if is_schema_urn(&k) {
                        // `{"urn:…:enterprise:2.0:User": {"department": …}}`
                        let Value::Object(inner) = v else {
                            return Err("invalidValue");
                        };
                        let ext = object_at(root, &k);
                        for (ik, iv) in inner {
                            set_ci(ext, &ik, iv);
                        }
                    } else {
                        let path = parse_path(&k).ok_or("invalidPath")?;
                        apply_op(root, &kind, &path, v)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn apply_op(
    root: &mut Map<String, Value>,
    kind: &str,
    p: &Path,
    value: Value,
) -> Result<(), PatchError> {
    if matches!(p.attr.to_ascii_lowercase().as_str(), "id" | "schemas" | "meta") && p.urn.is_none()
    {
        return Err("mutability");
    }
    let container = match &p.urn {
        Some(u) => object_at(root, u),
        None => root,
    };
    match kind {
        "add" | "replace" => {
            let add = kind == "add";
            match (&p.filter, &p.sub) {
                (None, None) => {
                    let slot = get_ci_mut(container, &p.attr);
                    match (slot, value) {
                        (Some(Value::Array(have)), Value::Array(more)) if add => {
                            for v in more {
                                if !have.contains(&v) {
                                    have.push(v);
                                }
                            }
                        }
                        (Some(Value::Object(have)), Value::Object(more)) => {
                            for (k, v) in more {
                                set_ci(have, &k, v);
                            }
                        }
                        (_, v) => set_ci(container, &p.attr, v),
                    }
                }
                (None, Some(sub)) => match get_ci_mut(container, &p.attr) {
                    Some(Value::Array(elements)) => {
                        for e in elements.iter_mut().filter_map(Value::as_object_mut) {
                            set_ci(e, sub, value.clone());
                        }
                    }
                    _ => set_ci(object_at(container, &p.attr), sub, value),
                },
                (Some(f), sub) => {
                    let Some(Value::Array(elements)) = get_ci_mut(container, &p.attr) else {
                        return Err("noTarget");
                    };
                    let mut hit = false;
                    for e in elements.iter_mut().filter(|e| element_matches(e, f)) {
                        let Some(o) = e.as_object_mut() else { continue };
                        hit = true;
                        match (sub, &value) {
                            (Some(sub), v) => set_ci(o, sub, v.clone()),
                            (None, Value::Object(more)) => {
                                for (k, v) in more {
                                    set_ci(o, k, v.clone());
                                }
                            }
                            (None, _) => return Err("invalidValue"),
                        }
                    }
                    if !hit {
                        return Err("noTarget");
                    }
                }
            }
        }
        "remove" => match (&p.filter, &p.sub) {
            (None, None) => match (get_ci_mut(container, &p.attr), &value) {
                // Azure AD style: `{"op": "remove", "path": "members", "value": [{"value": id}]}`
                (Some(Value::Array(have)), Value::Array(gone)) => {
                    have.retain(|e| {
                        !gone.iter().any(|g| match (g.get("value"), e.get("value")) {
                            (Some(a), Some(b)) => a == b,
                            _ => g == e,
                        })
                    });
                }
                _ => remove_ci(container, &p.attr),
            },
            (None, Some(sub)) => match get_ci_mut(container, &p.attr) {
                Some(Value::Object(o)) => remove_ci(o, sub),
                Some(Value::Array(elements)) => {
                    for e in elements.iter_mut().filter_map(Value::as_object_mut) {
                        remove_ci(e, sub);
                    }
                }
                _ => {}
            },
            (Some(f), None) => {
                let mut now_empty = false;
                if let Some(Value::Array(elements)) = get_ci_mut(container, &p.attr) {
                    elements.retain(|e| !element_matches(e, f));
                    now_empty = elements.is_empty();
                }
                if now_empty {
                    remove_ci(container, &p.attr);
                }
            }
            (Some(f), Some(sub)) => {
                if let Some(Value::Array(elements)) = get_ci_mut(container, &p.attr) {
                    for e in elements.iter_mut().filter(|e| element_matches(e, f)) {
                        if let Some(o) = e.as_object_mut() {
                            remove_ci(o, sub);
                        }
                    }
                }
            }
        },
        _ => return Err("invalidSyntax"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

    #[test]
    fn paths() {
        let p = parse_path("emails[type eq \"work\"].value").unwrap();
        assert_eq!(p.attr, "emails");
        assert_eq!(p.filter, Some(vec![("type".into(), json!("work"))]));
        assert_eq!(p.sub.as_deref(), Some("value"));
        let p = parse_path(&format!("{ENT}:manager.value")).unwrap();
        assert_eq!(p.urn.as_deref(), Some(ENT));
        assert_eq!((p.attr.as_str(), p.sub.as_deref()), ("manager", Some("value")));
        let p = parse_path("urn:ietf:params:scim:schemas:core:2.0:User:userName").unwrap();
        assert_eq!((p.urn, p.attr.as_str()), (None, "userName"));
        let p = parse_path("members[value eq \"a:b]c\"]").unwrap();
        assert_eq!(p.filter, Some(vec![("value".into(), json!("a:b]c"))]));
        assert!(parse_path("a.b.c").is_none());
        assert!(parse_path("").is_none());
    }

    #[test]
    fn filters() {
        let u = json!({"id": "1", "userName": "Ann", "externalId": "E1",
            "emails": [{"type": "work", "value": "a@x"}],
            ENT: {"department": "Sales"}});
        let ok = |f: &str| matches(&u, &parse_filter(f).unwrap());
        assert!(ok("userName eq \"ann\""));
        assert!(!ok("externalId eq \"e1\""));
        assert!(ok("externalId eq \"E1\""));
        assert!(ok("emails[type eq \"work\" and value eq \"a@x\"]"));
        assert!(!ok("emails[type eq \"home\"]"));
        assert!(ok(&format!("{ENT}:department eq \"Sales\" and userName eq \"Ann\"")));
        assert!(ok("emails.value eq \"a@x\""));
        assert!(parse_filter("userName sw \"a\"").is_none());
        assert!(parse_filter("userName eq \"a\" or userName eq \"b\"").is_none());
    }

    #[test]
    fn patches() {
        let mut u = json!({"id": "1", "userName": "a", "name": {"givenName": "A"},
            "emails": [{"type": "work", "value": "a@x"}]});
        let body = json!({"Operations": [
            {"op": "replace", "path": "name.familyName", "value": "B"},
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "b@x"},
            {"op": "add", "path": "emails", "value": [{"type": "home", "value": "h@x"}]},
            {"op": "replace", "path": format!("{ENT}:department"), "value": "Ops"},
            {"op": "replace", "value": {"active": false, "displayName": "A B"}},
            {"op": "remove", "path": "userName"},
        ]});
        apply_patch(&mut u, &body).unwrap();
        assert_eq!(
            u,
            json!({"id": "1", "name": {"givenName": "A", "familyName": "B"},
                "emails": [{"type": "work", "value": "b@x"}, {"type": "home", "value": "h@x"}],
                ENT: {"department": "Ops"}, "active": false, "displayName": "A B"})
        );
        let miss = json!({"Operations": [
            {"op": "replace", "path": "emails[type eq \"other\"].value", "value": "z"}]});
        assert_eq!(apply_patch(&mut u, &miss), Err("noTarget"));
        let mut g = json!({"id": "g", "members": [{"value": "1"}, {"value": "2"}]});
        apply_patch(&mut g, &json!({"Operations": [
            {"op": "add", "path": "members", "value": [{"value": "3"}, {"value": "1"}]},
            {"op": "remove", "path": "members[value eq \"2\"]"}]}))
        .unwrap();
        assert_eq!(g, json!({"id": "g", "members": [{"value": "1"}, {"value": "3"}]}));
    }

    #[test]
    fn projections() {
        let u = json!({"schemas": ["s"], "id": "1", "userName": "a", "title": "t",
            "name": {"givenName": "A", "familyName": "B"},
            "emails": [{"type": "work", "value": "a@x"}],
            ENT: {"department": "Sales", "costCenter": "1"}});
        let p = project(
            &u,
            Some(&format!("userName,name.givenName,emails,{ENT}:department")),
            None,
        );
        assert_eq!(
            p,
            json!({"schemas": ["s"], "id": "1", "userName": "a", "name": {"givenName": "A"},
                "emails": [{"type": "work", "value": "a@x"}], ENT: {"department": "Sales"}})
        );
        let p = project(&u, Some(ENT), None);
        assert_eq!(p[ENT]["costCenter"], json!("1"));
        let p = project(&u, None, Some("emails,name"));
        assert!(p.get("emails").is_none() && p.get("name").is_none() && p.get("title").is_some());
    }

    #[test]
    fn store_pages_and_deletes() {
        let mut s = Store::default();
        for i in 1..=5 {
            s.put(format!("u{i}"), json!({"id": format!("u{i}")}));
        }
        let ids = |s: &Store, a, n| -> Vec<String> {
            s.page(a, n)
                .map(|v| v["id"].as_str().unwrap_or("").to_string())
                .collect()
        };
        assert_eq!(ids(&s, 1, 2), ["u1", "u2"]);
        assert_eq!(ids(&s, 5, 10), ["u5"]);
        assert!(ids(&s, 6, 10).is_empty());
        assert!(s.remove("u2"));
        assert!(!s.remove("u2"));
        assert_eq!(ids(&s, 1, 10), ["u1", "u5", "u3", "u4"]);
        assert!(s.get("u5").is_some() && s.get("u2").is_none());
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn decoding() {
        assert_eq!(pct_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(
            query_param("startIndex=3&filter=userName%20eq%20%22x%22", "filter").as_deref(),
            Some("userName eq \"x\"")
        );
    }
}
