//! The per-VM API's live memory endpoints (docs/api.md): reads, page-table
//! listings, scans and watches of the running guest. This file only parses
//! bodies, fetches the vCPU registers through the controller (so the short
//! pause takes its turn like any other operation) and maps errors to
//! statuses; the work is in `ferry-inspect`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_inspect::{LiveMem, MapsRequest, PagingContext, ReadRequest, ScanOptions, ScanRequest, Watches};
use ferry_migrate::{ControlError, VmController};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::http::{Request, Response};

/// Watches running at once on one VM.
pub const MAX_WATCHES: usize = 8;
/// A watch without a pass for this long is ended.
pub const WATCH_IDLE: Duration = Duration::from_secs(300);
/// Longest read over the API (its hex must fit in a response).
pub const MAX_LIVE_READ: u64 = 1 << 20;

/// The fixed paths served here, with their methods (for 405 and the incoming VM's 409).
pub const LIVE_ENDPOINTS: &[(&str, &str)] =
    &[("/vm/memory/read", "PUT"), ("/vm/memory/maps", "PUT"), ("/vm/scan", "PUT"), ("/vm/scan/watch", "GET, PUT")];

/// The watch path prefix; `/vm/scan/watch/{id}` takes PUT (next pass) and DELETE.
const WATCH_PREFIX: &str = "/vm/scan/watch/";

/// One ferry process serves one VM, so its watches live here.
fn watches() -> &'static Watches {
    static W: OnceLock<Watches> = OnceLock::new();
    W.get_or_init(|| Watches::new(MAX_WATCHES, WATCH_IDLE))
}

/// Whether `path` is one of this module's.
pub fn serves(path: &str) -> bool {
    LIVE_ENDPOINTS.iter().any(|(p, _)| *p == path) || path.starts_with(WATCH_PREFIX)
}

fn body<T: DeserializeOwned>(req: &Request, what: &str) -> Result<T, Response> {
    let bytes: &[u8] = if req.body.iter().all(|b| b.is_ascii_whitespace()) { b"{}" } else { &req.body };
    let bad = |e: serde_json::Error| Response::error(400, format!("invalid {what} request: {e}"));
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
    if !v.is_object() {
        return Err(Response::error(400, format!("invalid {what} request: the body must be a JSON object")));
    }
    serde_json::from_value(v).map_err(bad)
}

/// 400 for what the client asked wrongly, 409 for a guest not in long mode, 500 for the image layer.
fn inspect_error(e: ferry_inspect::Error) -> Response {
    let status = match e {
        ferry_inspect::Error::UnsupportedPaging { .. } => 409,
        ferry_inspect::Error::Image(_) => 500,
        _ => 400,
    };
    Response::error(status, e)
}

fn watch_error(e: ferry_inspect::WatchError) -> Response {
    Response::error(e.status(), e)
}

/// The page tables of `vcpu` (default 0), or at `cr3` in its paging mode; the
/// registers come from a short pause through the controller (its length is returned).
fn paging(ctl: &VmController, vcpu: Option<usize>, cr3: Option<u64>) -> Result<(PagingContext, f64), Response> {
    let index = vcpu.unwrap_or(0);
    let r = ctl.vcpu_regs(index).map_err(crate::api::control_error)?;
    let ctx = ferry_inspect::live_context(index, &r.regs, cr3).map_err(inspect_error)?;
    Ok((ctx, r.pause_ms))
}

/// Page tables for a watch pass: a failure (a snapshot holds the VM) keeps the last ones.
fn pass_paging(ctl: &VmController, vcpu: Option<usize>) -> Option<(PagingContext, f64)> {
    let index = vcpu?;
    match ctl.vcpu_regs(index) {
        Ok(r) => ferry_inspect::live_context(index, &r.regs, None).ok().map(|c| (c, r.pause_ms)),
        Err(ControlError::Busy { .. }) => None,
        Err(_) => None,
    }
}

/// A 200 with `registers_pause_ms` added: how long the guest was paused to read
/// the vCPU's registers for this request (absent when it was not paused).
fn ok_with_pause(v: &impl serde::Serialize, pause_ms: Option<f64>) -> Response {
    let mut v = serde_json::to_value(v).unwrap_or_default();
    if let (Some(ms), Some(o)) = (pause_ms, v.as_object_mut()) {
        o.insert("registers_pause_ms".into(), json!(ms));
    }
    Response::json(200, &v)
}

fn method_not_allowed(m: &str, p: &str, allow: &'static str) -> Response {
    let mut r = Response::error(405, format!("method {m} not allowed on {p}; allowed: {allow}"));
    r.allow = Some(allow);
    r
}

/// Serves one of the live endpoints (the caller checked [`serves`]).
pub fn route(ctl: &Arc<VmController>, req: &Request) -> Response {
    let m = req.method.as_str();
    let p = req.path.as_str();
    let mem = || LiveMem::new(ctl.vm().ram().clone());
    match (m, p) {
        ("PUT", "/vm/memory/read") => {
            let r: ReadRequest = match body(req, "read") {
                Ok(r) => r,
                Err(e) => return e,
            };
            if let Err(e) = r.validate() {
                return inspect_error(e);
            }
            if r.len == 0 || r.len > MAX_LIVE_READ {
                return Response::error(400, format!("len {} must be 1..={MAX_LIVE_READ} bytes", r.len));
            }
            let (ctx, pause) = if r.needs_paging() {
                match paging(ctl, r.vcpu, r.cr3) {
                    Ok((c, ms)) => (Some(c), Some(ms)),
                    Err(e) => return e,
                }
            } else {
                (None, None)
            };
            match ferry_inspect::read_live(&mut mem(), &r, ctx.as_ref()) {
                Ok(v) => ok_with_pause(&v, pause),
                Err(e) => inspect_error(e),
            }
        }
        ("PUT", "/vm/memory/maps") => {
            let r: MapsRequest = match body(req, "maps") {
                Ok(r) => r,
                Err(e) => return e,
            };
            let (ctx, pause) = match paging(ctl, r.vcpu, r.cr3) {
                Ok(c) => c,
                Err(e) => return e,
            };
            match ferry_inspect::maps(&mut mem(), &ctx) {
                Ok(v) => ok_with_pause(&v, Some(pause)),
                Err(e) => inspect_error(e),
            }
        }
        ("PUT", "/vm/scan") => {
            let r: ScanRequest = match body(req, "scan") {
                Ok(r) => r,
                Err(e) => return e,
            };
            let matcher = match r.matcher() {
                Ok(m) => m,
                Err(e) => return inspect_error(e),
            };
            let (ctx, pause) = match r.vcpu {
                Some(v) => match paging(ctl, Some(v), None) {
                    Ok((c, ms)) => (Some(c), Some(ms)),
                    Err(e) => return e,
                },
                None => (None, None),
            };
            let opts = ScanOptions { max_matches: r.listed(), paging: ctx, ..ScanOptions::default() };
            match matcher.scan(&mut mem(), &opts) {
                Ok(v) => ok_with_pause(&v, pause),
                Err(e) => inspect_error(e),
            }
        }
        ("PUT", "/vm/scan/watch") => {
            let r: ScanRequest = match body(req, "watch") {
                Ok(r) => r,
                Err(e) => return e,
            };
            // Compile the patterns or rules before pausing for registers.
            let matcher = match r.matcher() {
                Ok(m) => m,
                Err(e) => return inspect_error(e),
            };
            let (ctx, pause) = match r.vcpu {
                Some(v) => match paging(ctl, Some(v), None) {
                    Ok((c, ms)) => (Some(c), Some(ms)),
                    Err(e) => return e,
                },
                None => (None, None),
            };
            match watches().create(ctl.vm(), &r, matcher, ctx) {
                Ok(v) => ok_with_pause(&v, pause),
                Err(e) => watch_error(e),
            }
        }
        ("GET", "/vm/scan/watch") => Response::json(200, &json!({ "watches": watches().list() })),
        (_, p) if p.starts_with(WATCH_PREFIX) => {
            let tail = &p[WATCH_PREFIX.len()..];
            let Some(id) = tail.parse::<u64>().ok().filter(|_| tail.bytes().all(|b| b.is_ascii_digit())) else {
                return Response::error(404, format!("no such endpoint {p}: a watch id is a decimal number"));
            };
            match m {
                "PUT" => {
                    if let Err(e) = body::<serde_json::Map<String, serde_json::Value>>(req, "pass").and_then(|b| {
                        b.keys().next().map_or(Ok(()), |k| {
                            Err(Response::error(400, format!("unknown field {k:?}: a pass takes no fields")))
                        })
                    }) {
                        return e;
                    }
                    let vcpu = match watches().vcpu_of(id) {
                        Ok(v) => v,
                        Err(e) => return watch_error(e),
                    };
                    let got = pass_paging(ctl, vcpu);
                    match watches().pass(id, got.map(|g| g.0)) {
                        Ok(v) => ok_with_pause(&v, got.map(|g| g.1)),
                        Err(e) => watch_error(e),
                    }
                }
                "DELETE" => match watches().remove(id) {
                    Ok(v) => Response::json(200, &v),
                    Err(e) => watch_error(e),
                },
                _ => method_not_allowed(m, p, "PUT, DELETE"),
            }
        }
        (_, p) => match LIVE_ENDPOINTS.iter().find(|(path, _)| *path == p) {
            Some((_, allow)) => method_not_allowed(m, p, allow),
            None => Response::error(404, format!("no such endpoint {p}")),
        },
    }
}
