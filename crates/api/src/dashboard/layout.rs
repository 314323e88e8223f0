//! The page frame (navigation, stylesheet), the script, and formatting
//! helpers shared by the pages. Everything user-controlled goes through
//! maud's escaping `(expr)`; nothing here uses `PreEscaped` on data.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use pubrun_core::run::RunStatus;

use super::Ctx;

const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;display:flex;align-items:center;gap:1.2em;padding:.55em 1.2em}
header .brand{font-weight:700;font-size:16px;color:#fff;text-decoration:none;margin-right:.6em}
header nav a{color:#d0d7de;text-decoration:none;padding:.3em .5em;border-radius:4px}
header nav a.on,header nav a:hover{color:#fff;background:#3b434b}
header form{margin-left:auto}
main{max-width:1200px;margin:0 auto;padding:1em 1.2em 3em}
h1{font-size:20px;margin:.4em 0 .6em}
h2{font-size:16px;margin:1.4em 0 .5em}
a{color:#0969da}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de;border-radius:6px;overflow:hidden}
th,td{text-align:left;padding:.4em .7em;border-bottom:1px solid #eaeef2;vertical-align:top;overflow-wrap:anywhere}
th{background:#f6f8fa;font-weight:600;color:#57606a;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#57606a}
.badge{display:inline-block;padding:.05em .55em;border-radius:10px;font-size:12px;font-weight:600;background:#eaeef2;color:#24292f}
.s-succeeded,.s-ready,.s-idle{background:#dafbe1;color:#1a7f37}
.s-failed,.s-timed_out{background:#ffebe9;color:#cf222e}
.s-running,.s-starting,.s-busy,.s-provisioning{background:#ddf4ff;color:#0969da}
.s-queued,.s-stopping{background:#fff8c5;color:#9a6700}
.s-cancelled,.s-stopped{background:#eaeef2;color:#57606a}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:1em}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.8em 1em}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.25em 1em;margin:0}
dl.kv dt{color:#57606a}
dl.kv dd{margin:0;overflow-wrap:anywhere}
dl.kv dd table{width:auto;border:0;background:transparent}
dl.kv dd table td{padding:.1em 1em .1em 0;border:0}
.stats{display:flex;gap:1em;flex-wrap:wrap}
.stat{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.6em 1.2em;min-width:140px}
.stat b{display:block;font-size:22px;font-weight:600}
.stat span{color:#57606a;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
pre{background:#0d1117;color:#e6edf3;padding:.8em 1em;border-radius:6px;overflow:auto;max-height:70vh;font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;overflow-wrap:anywhere}
pre.light{background:#fff;color:#1f2328;border:1px solid #d0d7de}
form.inline{display:inline}
button,.button{font:inherit;font-size:13px;padding:.25em .8em;border:1px solid #d0d7de;border-radius:6px;background:#f6f8fa;color:#24292f;cursor:pointer;text-decoration:none}
button:hover{background:#eaeef2}
button.danger{color:#cf222e}
button.primary{background:#1f883d;border-color:#1a7f37;color:#fff}
header button{background:transparent;color:#d0d7de;border-color:#57606a}
.filters{display:flex;gap:.6em;align-items:end;margin:.4em 0 1em;flex-wrap:wrap}
label{display:flex;flex-direction:column;font-size:12px;color:#57606a;gap:.2em}
input,select,textarea{font:inherit;padding:.3em .5em;border:1px solid #d0d7de;border-radius:6px;background:#fff}
textarea{font-family:ui-monospace,monospace;min-width:28em}
.error{color:#cf222e}
.pager{margin-top:.8em;display:flex;gap:1em}
.login{max-width:340px;margin:12vh auto;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:1.5em}
.login h1{margin-top:0}
.login input{width:100%;margin:.4em 0 1em}
tr.folder a{font-weight:600}
.actions{display:flex;gap:.5em;margin:.6em 0 1em;flex-wrap:wrap}
"#;

/// The dashboard's only script: live logs (appended as text, never as
/// markup) and live status.
const SCRIPT: &str = r#"// pubrun dashboard
(function () {
  var log = document.getElementById('log');
  if (!log || log.dataset.live !== '1') return;
  var status = document.getElementById('status');
  var es = new EventSource(log.dataset.src);
  es.addEventListener('log', function (e) {
    var bottom = window.scrollY > 0 && window.innerHeight + window.scrollY >= document.body.scrollHeight - 30;
    log.textContent += JSON.parse(e.data);
    if (bottom) window.scrollTo(0, document.body.scrollHeight);
  });
  es.addEventListener('status', function (e) {
    var s = JSON.parse(e.data);
    if (status) { status.textContent = s; status.className = 'badge s-' + s; }
  });
  es.addEventListener('end', function () {
    es.close();
    location.reload();
  });
})();
"#;

pub(crate) async fn script() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            ),
        ],
        SCRIPT,
    )
        .into_response()
}

/// Which navigation entry is highlighted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Runs,
    Jobs,
    Schedules,
    Buckets,
    Pools,
}

const NAV: [(Nav, &str, &str); 6] = [
    (Nav::Overview, "/", "Overview"),
    (Nav::Runs, "/ui/runs", "Runs"),
    (Nav::Jobs, "/ui/jobs", "Jobs"),
    (Nav::Schedules, "/ui/schedules", "Schedules"),
    (Nav::Buckets, "/ui/buckets", "Buckets"),
    (Nav::Pools, "/ui/pools", "Pools"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · pubrun" }
            // A constant of this file, not data.
            style { (PreEscaped(CSS)) }
        }
    }
}

/// A full page with navigation.
pub(crate) fn page(ctx: &Ctx, title: &str, nav: Nav, body: Markup) -> Response {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
        (head(title))
        body {
            header {
                a.brand href="/" { "pubrun" }
                nav {
                    @for (n, href, label) in NAV {
                        a href=(href) class=[(n == nav).then_some("on")] { (label) }
                    }
                }
                @if ctx.logged_in() {
                    (button(ctx, "/ui/logout", "Log out", ""))
                }
            }
            main { (body) }
            script src="/ui/static/app.js" {}
        }
        }
    };
    m.into_response()
}

/// A page without navigation or session (errors).
pub(crate) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header { a.brand href="/" { "pubrun" } }
                main { (body) }
            }
        }
    }
}

pub(crate) fn login_page(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body {
                form.login method="post" action="/login" {
                    h1 { "pubrun" }
                    p.muted { "This server requires its token (" code { "--token" } " / " code { "PUBRUN_TOKEN" } ")." }
                    @if let Some(e) = error { p.error #login-error { (e) } }
                    label { "Token" input type="password" name="token" autocomplete="current-password" autofocus; }
                    button.primary type="submit" { "Log in" }
                }
            }
        }
    }
}

/// A one-button form that POSTs to `action` with the session's CSRF token.
pub(crate) fn button(ctx: &Ctx, action: &str, label: &str, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(ctx.csrf);
            button type="submit" class=(class) { (label) }
        }
    }
}

/// Characters kept as they are in a path segment or query value.
const PART: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one path segment or query value.
/// A section listing things: `listed` (a table), or when there is nothing to
/// list, `none` as a muted note saying so.
pub(crate) fn listing(nothing: bool, none: Markup, listed: Markup) -> Markup {
    html! {
        @if nothing { p.muted { (none) } } @else { (listed) }
    }
}

pub(crate) fn enc(s: &str) -> String {
    utf8_percent_encode(s, PART).to_string()
}

pub(crate) fn status_badge(s: RunStatus) -> Markup {
    html! { span class={"badge s-" (s.as_str())} { (s.as_str()) } }
}

pub(crate) fn badge(text: &str) -> Markup {
    html! { span class={"badge s-" (text)} { (text) } }
}

/// UTC time of a millisecond timestamp.
pub(crate) fn time_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// "3 min ago"-style age of a millisecond timestamp.
pub(crate) fn ago_ms(ms: i64, now_ms: i64) -> String {
    format!("{} ago", duration_ms((now_ms - ms).max(0)))
}

/// A short human duration.
pub(crate) fn duration_ms(ms: i64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if s < 60 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} d {} h", s / 86400, (s % 86400) / 3600)
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(duration_ms(250), "250 ms");
        assert_eq!(duration_ms(1500), "1.5 s");
        assert_eq!(duration_ms(125_000), "2 min 5 s");
        assert_eq!(duration_ms(3 * 3_600_000 + 60_000), "3 h 1 min");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(enc("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(time_ms(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn markup_escapes_data() {
        let hostile = "<script>alert(1)</script>";
        let m = html! { td { (hostile) } a href={"/x?n=" (enc(hostile))} { "x" } };
        let s = m.into_string();
        assert!(!s.contains("<script>"), "{s}");
        assert!(s.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{s}");
    }
}
