//! Compiling `events[]`: a rule's method set, path template, statuses, conditions, organisation source and
//! refetch, each error named by its JSON path.

use super::*;

pub(super) fn compile_rule(raw: &RawRule, at: &str, errors: &mut Errors) -> Option<EventRule> {
    let mark = errors.mark();
    if !is_event_type(&raw.event_type) {
        errors.push(
            format!("{at}.type"),
            format!(
                "{:?} must follow {{resource}}.{{event}} in lowercase, e.g. job.completed",
                raw.event_type
            ),
        );
    }
    if raw.object_type.is_empty() {
        errors.push(format!("{at}.objectType"), "must not be empty");
    }
    let matching = &raw.matching;
    let methods = compile_methods(&matching.methods, &format!("{at}.match.methods"), errors);
    let path = PathTemplate::parse(&matching.path)
        .map(|t| t.with_case_insensitive(matching.case_insensitive))
        .map_err(|e| errors.push(format!("{at}.match.path"), e))
        .ok();
    let statuses = compile_statuses(
        matching.status.as_deref(),
        &format!("{at}.match.status"),
        errors,
    );
    let when = compile_conditions(&raw.when, at, errors);
    check_pointer(&raw.object, &format!("{at}.object"), errors);
    let organisation = compile_organisation(
        &raw.organisation_id,
        path.as_ref(),
        &format!("{at}.organisationId"),
        errors,
    );
    let refetch = raw
        .refetch
        .as_ref()
        .and_then(|r| compile_refetch(r, path.as_ref(), &format!("{at}.refetch"), errors));
    if !errors.clean_since(mark) {
        return None;
    }
    Some(EventRule {
        event_type: raw.event_type.clone(),
        object_type: raw.object_type.clone(),
        methods,
        path: path?,
        statuses,
        when,
        object_pointer: raw.object.clone(),
        organisation,
        refetch,
    })
}

/// `refetch`: a known method, a path whose captures are all `match.path`'s (`path` is the parsed
/// `match.path`, if it parsed), a cluster that is not empty.
fn compile_refetch(
    raw: &RawRefetch,
    path: Option<&PathTemplate>,
    at: &str,
    errors: &mut Errors,
) -> Option<RefetchSpec> {
    if MethodSet::bit(&raw.method).is_none() {
        errors.push(
            format!("{at}.method"),
            format!("{:?} is not an uppercase HTTP method", raw.method),
        );
    }
    if raw.cluster.as_deref() == Some("") {
        errors.push(format!("{at}.cluster"), "must not be empty");
    }
    // A match.path that did not parse has its own error.
    let parts = RefetchSpec::parse_path(&raw.path, path?)
        .map_err(|e| errors.push(format!("{at}.path"), e))
        .ok()?;
    Some(RefetchSpec {
        method: raw.method.clone(),
        path: parts,
        cluster: raw.cluster.clone(),
    })
}

fn compile_methods(names: &[String], at: &str, errors: &mut Errors) -> MethodSet {
    let mut methods = MethodSet::default();
    if names.is_empty() {
        errors.push(at, "must not be empty");
    }
    for (i, m) in names.iter().enumerate() {
        match MethodSet::bit(m) {
            Some(bit) => methods.insert(bit),
            None => errors.push(
                format!("{at}[{i}]"),
                format!("{m:?} is not an uppercase HTTP method"),
            ),
        }
    }
    methods
}

fn compile_statuses(given: Option<&[u16]>, at: &str, errors: &mut Errors) -> Vec<u16> {
    let Some(list) = given else {
        return defaults::STATUSES.collect();
    };
    if list.is_empty() {
        errors.push(at, "must not be empty");
    }
    for (i, s) in list.iter().enumerate() {
        if !(100..600).contains(s) {
            errors.push(
                format!("{at}[{i}]"),
                "must be an HTTP status from 100 to 599",
            );
        }
    }
    list.to_vec()
}

/// `when[]`: each condition tests one pointer with exactly one of `equals` or `exists`.
fn compile_conditions(raw: &[RawCondition], at: &str, errors: &mut Errors) -> Vec<Condition> {
    let mut when = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let at = format!("{at}.when[{i}]");
        check_pointer(&c.pointer, &format!("{at}.pointer"), errors);
        let check = match (&c.equals, c.exists) {
            (Some(v), None) => Check::Equals(v.clone()),
            (None, Some(b)) => Check::Exists(b),
            _ => {
                errors.push(at, "must have exactly one of equals or exists");
                continue;
            }
        };
        when.push(Condition {
            pointer: c.pointer.clone(),
            check,
        });
    }
    when
}

fn check_pointer(pointer: &str, at: &str, errors: &mut Errors) {
    if let Err(e) = validate_json_pointer(pointer) {
        errors.push(at, e);
    }
}

/// Where a rule finds the organisation; `path` is the rule's parsed `match.path`, if it parsed.
fn compile_organisation(
    raw: &RawOrganisation,
    path: Option<&PathTemplate>,
    at: &str,
    errors: &mut Errors,
) -> OrganisationSource {
    match raw {
        RawOrganisation::Header(name) => {
            if !is_header_name(name) {
                errors.push(format!("{at}.header"), "must be a header name");
            }
            OrganisationSource::Header(name.to_ascii_lowercase())
        }
        RawOrganisation::Pointer(p) => {
            check_pointer(p, &format!("{at}.pointer"), errors);
            OrganisationSource::Pointer(p.clone())
        }
        RawOrganisation::PathParam(name) => {
            // A path that did not parse has its own error; no second one about its captures.
            if path.is_some_and(|t| !t.has_capture(name)) {
                errors.push(
                    format!("{at}.pathParam"),
                    format!("match.path has no {{{name}}} capture"),
                );
            }
            OrganisationSource::PathParam(name.clone())
        }
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}
