//! A strict parser for the classic Prometheus text format 0.0.4, as much of it as the
//! worker emits, shared by the end-to-end tests (as `common::prometheus`) and by
//! worker-runtime's own observability tests (included by path).

// Each test binary uses its own part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

#[derive(Debug)]
pub(crate) struct Family {
    pub(crate) name: String,
    pub(crate) help: String,
    pub(crate) kind: String,
    pub(crate) samples: Vec<Sample>,
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && !s.starts_with("__")
}

fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => return Err(format!("bad escape in HELP: \\{other:?}")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
            s.parse().map_err(|e| format!("bad value {s:?}: {e}"))
        }
        _ => Err(format!("bad value {s:?}")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let chars: Vec<char> = line[name_end..].chars().collect();
    let mut i = 0;
    let mut labels = BTreeMap::new();
    if chars.first() == Some(&'{') {
        i = 1;
        loop {
            if chars.get(i) == Some(&'}') {
                if !labels.is_empty() {
                    return Err(format!("trailing comma in {line:?}"));
                }
                i += 1;
                break;
            }
            let start = i;
            while chars.get(i).is_some_and(|c| *c != '=') {
                i += 1;
            }
            let lname: String = chars[start..i].iter().collect();
            if !valid_label_name(&lname) {
                return Err(format!("bad label name {lname:?} in {line:?}"));
            }
            if chars.get(i) != Some(&'=') || chars.get(i + 1) != Some(&'"') {
                return Err(format!("expected =\" after {lname} in {line:?}"));
            }
            i += 2;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(format!("unterminated label value in {line:?}")),
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => return Err(format!("bad escape \\{other:?} in {line:?}")),
                        }
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
            if labels.insert(lname.clone(), value).is_some() {
                return Err(format!("label {lname} twice in {line:?}"));
            }
            match chars.get(i) {
                Some(',') => {
                    i += 1;
                    if chars.get(i) == Some(&'}') {
                        return Err(format!("trailing comma in {line:?}"));
                    }
                }
                Some('}') => {
                    i += 1;
                    break;
                }
                other => return Err(format!("expected , or }} not {other:?} in {line:?}")),
            }
        }
    }
    if chars.get(i) != Some(&' ') {
        return Err(format!("expected one space before the value in {line:?}"));
    }
    let value_text: String = chars[i + 1..].iter().collect();
    if value_text.contains(' ') {
        return Err(format!("unexpected timestamp or junk in {line:?}"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: parse_value(&value_text)?,
    })
}

/// Parses the exposition text strictly: every family has HELP then TYPE, samples stay
/// in their family, no series twice, counters end in `_total` and are finite and
/// non-negative, histograms are cumulative and end in `+Inf` equal to `_count`.
pub(crate) fn parse_strict(text: &str) -> Result<Vec<Family>, String> {
    if !text.ends_with('\n') {
        return Err("the text must end with a line feed".into());
    }
    let mut fams: Vec<Family> = Vec::new();
    let mut names = BTreeSet::new();
    let mut series = BTreeSet::new();
    let mut pending_help: Option<(String, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.is_empty() {
            return Err(format!("line {n}: blank line"));
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or(format!("line {n}: HELP without text"))?;
            if !valid_metric_name(name) || names.contains(name) || pending_help.is_some() {
                return Err(format!("line {n}: bad or repeated HELP for {name}"));
            }
            pending_help = Some((name.to_owned(), unescape_help(help)?));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or(format!("line {n}: TYPE without type"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("line {n}: unknown type {kind}"));
            }
            let help = match pending_help.take() {
                Some((h, text)) if h == name => text,
                _ => {
                    return Err(format!(
                        "line {n}: TYPE {name} without its HELP just before"
                    ));
                }
            };
            if !names.insert(name.to_owned()) {
                return Err(format!("line {n}: TYPE {name} twice"));
            }
            fams.push(Family {
                name: name.to_owned(),
                help,
                kind: kind.to_owned(),
                samples: Vec::new(),
            });
        } else if line.starts_with('#') {
            return Err(format!("line {n}: unexpected comment {line:?}"));
        } else {
            if pending_help.is_some() {
                return Err(format!("line {n}: HELP not followed by TYPE"));
            }
            let fam = fams
                .last_mut()
                .ok_or(format!("line {n}: sample before any TYPE"))?;
            let s = parse_sample(line).map_err(|e| format!("line {n}: {e}"))?;
            let ok = match fam.kind.as_str() {
                "histogram" => {
                    (s.name == format!("{}_bucket", fam.name) && s.labels.contains_key("le"))
                        || ((s.name == format!("{}_sum", fam.name)
                            || s.name == format!("{}_count", fam.name))
                            && !s.labels.contains_key("le"))
                }
                _ => s.name == fam.name,
            };
            if !ok {
                return Err(format!(
                    "line {n}: sample {} outside its family {}",
                    s.name, fam.name
                ));
            }
            if !series.insert((s.name.clone(), s.labels.clone())) {
                return Err(format!("line {n}: series repeated: {line}"));
            }
            fam.samples.push(s);
        }
    }
    if pending_help.is_some() {
        return Err("HELP at the end without TYPE".into());
    }
    for fam in &fams {
        if fam.help.is_empty() {
            return Err(format!("{} has an empty HELP", fam.name));
        }
        match fam.kind.as_str() {
            "counter" => {
                if !fam.name.ends_with("_total") {
                    return Err(format!("counter {} does not end in _total", fam.name));
                }
                if let Some(s) = fam
                    .samples
                    .iter()
                    .find(|s| !(s.value >= 0.0 && s.value.is_finite()))
                {
                    return Err(format!("counter sample {s:?} is negative or not finite"));
                }
            }
            "histogram" => check_histogram(fam)?,
            _ => {}
        }
    }
    Ok(fams)
}

/// Buckets `(le, cumulative count)`, `_sum` and `_count` of one label set.
type HistogramGroup = (Vec<(f64, f64)>, Option<f64>, Option<f64>);

fn check_histogram(fam: &Family) -> Result<(), String> {
    let mut groups: BTreeMap<BTreeMap<String, String>, HistogramGroup> = BTreeMap::new();
    for s in &fam.samples {
        let mut key = s.labels.clone();
        let le = key.remove("le");
        let g = groups.entry(key).or_default();
        if let Some(le) = le {
            g.0.push((parse_value(&le)?, s.value));
        } else if s.name.ends_with("_sum") {
            g.1 = Some(s.value);
        } else {
            g.2 = Some(s.value);
        }
    }
    for (labels, (buckets, sum, count)) in groups {
        let count = count.ok_or(format!("{} {labels:?}: no _count", fam.name))?;
        sum.ok_or(format!("{} {labels:?}: no _sum", fam.name))?;
        let last = buckets
            .last()
            .ok_or(format!("{} {labels:?}: no buckets", fam.name))?;
        if last.0 != f64::INFINITY || last.1 != count {
            return Err(format!(
                "{} {labels:?}: +Inf bucket missing or != _count",
                fam.name
            ));
        }
        for w in buckets.windows(2) {
            if w[1].0 <= w[0].0 || w[1].1 < w[0].1 {
                return Err(format!(
                    "{} {labels:?}: buckets not cumulative: {w:?}",
                    fam.name
                ));
            }
        }
    }
    Ok(())
}

/// The value of the sample `name` with exactly `labels`.
pub(crate) fn sample(fams: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    fams.iter()
        .flat_map(|f| &f.samples)
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// The sum of the samples `name` whose labels include all of `labels`.
pub(crate) fn sum(fams: &[Family], name: &str, labels: &[(&str, &str)]) -> f64 {
    fams.iter()
        .flat_map(|f| &f.samples)
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The family `name`.
pub(crate) fn family<'a>(fams: &'a [Family], name: &str) -> &'a Family {
    fams.iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no metric family {name}"))
}
