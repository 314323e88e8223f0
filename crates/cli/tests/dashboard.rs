//! The web dashboard driven by a real browser: Debian's `chromium` through
//! `chromedriver` (WebDriver) and `fantoccini`, against the real `pubrun`
//! binary. `.ci/run` installs both; elsewhere the tests are skipped with a
//! note when `chromedriver` is missing (they fail under `CI`).
//!
//! `PUBRUN_SCREENSHOTS=DIR cargo test -p pubrun --test dashboard screenshots`
//! renews the README's pictures (`docs/screenshots`).

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use common::{free_port, Serve, ServeBuilder, BIN};

/// Generous: two cores shared with a compiler, a browser and the jobs.
const PATIENCE: Duration = Duration::from_secs(60);
/// The script elements a page is allowed to have: the dashboard's own.
const OWN_SCRIPTS: &str = "return Array.from(document.scripts).filter(s => s.getAttribute('src') !== '/ui/static/app.js').length";

// ---------------------------------------------------------------- fixtures

// A child process (chromedriver, an agent) killed when dropped.
use common::Server as Proc;

fn start(manifest: &str, token: Option<&str>) -> Serve {
    ServeBuilder::new()
        .config(manifest)
        .maybe_token(token)
        .log_level("info")
        .patience(PATIENCE)
        .start()
}

/// Requests the dashboard tests make of the harness's server.
impl Serve {
    /// Publishes one message through the Pub/Sub REST API.
    async fn publish(&self, topic: &str, data: &str, attributes: serde_json::Value) {
        use base64::Engine as _;
        let body = json!({ "messages": [{
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "attributes": attributes,
        }]});
        let req = reqwest::Client::new()
            .post(self.url(&format!("/v1/projects/demo/topics/{topic}:publish")))
            .json(&body);
        common::ok_json(req, "publish").await;
    }

    /// Uploads an object through the Cloud Storage JSON API.
    async fn upload(&self, bucket: &str, name: &str, body: &'static str) {
        let req = reqwest::Client::new()
            .post(self.url(&format!("/upload/storage/v1/b/{bucket}/o")))
            .query(&[("uploadType", "media"), ("name", name)])
            .header("content-type", "text/plain")
            .body(body);
        common::ok_json(req, "upload").await;
    }

    async fn run_status(&self, id: &str) -> String {
        let v: serde_json::Value = get_json(self.url(&format!("/api/v1/runs/{id}"))).await;
        v["run"]["status"].as_str().unwrap_or_default().to_string()
    }
}

/// `chromedriver`, or `None` (skip, with a note) where it or Chromium is not
/// installed; under `CI=true` a missing browser fails the test instead.
fn chromedriver() -> Option<PathBuf> {
    const HINT: &str = ".ci/run installs Debian's chromium and chromium-driver";
    let driver = pubrun_testkit::require("dashboard", "chromedriver", HINT)?;
    let on_path = pubrun_testkit::on_path;
    if on_path("chromium")
        .or_else(|| on_path("google-chrome"))
        .is_none()
    {
        pubrun_testkit::skip("dashboard", &format!("chromium is not installed ({HINT})"));
        return None;
    }
    Some(driver)
}

/// A headless Chromium session, ended (and its driver stopped) when
/// dropped, also when a test fails: killing only the driver would leave
/// Chromium's processes behind.
struct Browser {
    c: Client,
    session: Option<String>,
    port: u16,
    _driver: Proc,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(id) = &self.session {
            end_session(self.port, id);
        }
    }
}

/// WebDriver's Delete Session, which makes the driver quit the browser.
/// Synchronous (a `Drop` cannot await); best effort.
fn end_session(port: u16, id: &str) {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let req = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_ok() {
        let _ = s.read_to_end(&mut Vec::new());
    }
}

async fn browser(driver: &Path) -> Browser {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let mut proc = Proc(child);
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = proc.0.try_wait().unwrap() {
            panic!("chromedriver exited: {s}");
        }
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut opts = json!({
        // We run as root in CI: Chromium's sandbox needs a user namespace.
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1280,800",
                 "--hide-scrollbars"],
    });
    if Path::new("/usr/bin/chromium").exists() {
        opts["binary"] = json!("/usr/bin/chromium");
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), opts);
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session with headless chromium");
    let session = c.session_id().await.ok().flatten();
    Browser {
        c,
        session,
        port,
        _driver: proc,
    }
}

impl Browser {
    /// Waits (up to PATIENCE) for an element whose text contains `text`.
    /// A lookup that fails counts as "not yet": a submitted form navigates,
    /// and a lookup during that answers "aborted by navigation".
    async fn wait_text(&self, css_id: &str, text: &str) {
        let xpath = format!("//*[@id='{css_id}'][contains(., {})]", xpath_literal(text));
        let deadline = Instant::now() + PATIENCE;
        loop {
            let err = match self.c.find(Locator::XPath(&xpath)).await {
                Ok(_) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "#{css_id} never contained {text:?}: {err}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn body_text(&self) -> String {
        self.c
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Reloads `url` until `css` matches (a server-rendered list has no
    /// live updates), up to PATIENCE; returns the element's `href`.
    async fn reload_until(&self, url: &str, css: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.c.goto(url).await.unwrap();
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                return e.attr("href").await.unwrap().unwrap_or_default();
            }
            assert!(Instant::now() < deadline, "{css} never appeared on {url}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reloads the overview until topic `topic`'s publish rate is above
    /// zero (the sampler needs a reading a few seconds old); returns it.
    async fn publish_rate(&self, url: &str, topic: &str) -> String {
        let xpath = format!(
            "//table[@id='topics']//tr[td[1]={}]/td[3]",
            xpath_literal(topic)
        );
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.c.goto(url).await.unwrap();
            let rate = self
                .c
                .find(Locator::XPath(&xpath))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if rate.ends_with("/s") && rate != "0/s" {
                return rate;
            }
            assert!(
                Instant::now() < deadline,
                "{topic}: publish rate stayed {rate:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The `href` of the (first) element `css`, which must have one.
    async fn href(&self, css: &str) -> String {
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .attr("href")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{css} has no href"))
    }

    /// Clicks the element `css`.
    async fn click(&self, css: &str) {
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Waits (up to PATIENCE) for an element matching `css`; `what` says
    /// what it stands for when it never comes.
    async fn wait_for(&self, css: &str, what: &str) {
        self.c
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{what} ({css}) never appeared: {e}"));
    }

    /// Clicks the button `css` (a form post) and waits for the page the
    /// post leads to, so that a following `goto` cannot cancel the post.
    async fn submit(&self, css: &str) {
        self.c
            .execute("document.body.dataset.before = '1'", vec![])
            .await
            .unwrap();
        self.click(css).await;
        let after = format!("{css}: the page after the post");
        self.wait_for("body:not([data-before])", &after).await;
    }

    /// No alert or dialog is open and the page has no script but ours.
    async fn assert_nothing_injected(&self) {
        assert!(
            self.c.get_alert_text().await.is_err(),
            "a dialog opened: injected script ran"
        );
        let foreign = self.c.execute(OWN_SCRIPTS, vec![]).await.unwrap();
        assert_eq!(
            foreign,
            json!(0),
            "the page has a script element it should not"
        );
    }
}

/// GETs `url` and parses its JSON body.
async fn get_json(url: impl reqwest::IntoUrl) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// An XPath string literal for any text.
fn xpath_literal(s: &str) -> String {
    if !s.contains('\'') {
        format!("'{s}'")
    } else {
        let parts: Vec<String> = s.split('\'').map(|p| format!("'{p}'")).collect();
        format!("concat({})", parts.join(", \"'\", "))
    }
}

const JOBS: &str = include_str!("manifests/dashboard-jobs.toml");

/// A server on `manifest` and a browser for it; none when the browser is
/// not installed (the test is skipped).
async fn session(manifest: &str) -> Option<(Serve, Browser)> {
    let driver = chromedriver()?;
    let s = start(manifest, None);
    let b = browser(&driver).await;
    Some((s, b))
}

// ------------------------------------------------------------------ tests

/// Publish → the run appears on the runs page, its page streams the line
/// the job printed (server-sent events), and a hostile attribute shows as
/// text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_run_appears_and_streams_its_log() {
    let Some((s, b)) = session(JOBS).await else {
        return;
    };
    let hostile = "<script>alert(2)</script>";
    s.publish("work", "payload", json!({ "n": "1", "note": hostile }))
        .await;
    let href = b
        .reload_until(&s.url("/ui/runs?job=hello"), "#runs a[href^='/ui/runs/']")
        .await;
    b.click(&format!("#runs a[href='{href}']")).await;
    b.wait_text("log", "hello-from-job-1").await;
    // A log line with markup arrives as text, live ...
    b.wait_text("log", "<b id=injected>log markup</b>").await;
    assert!(b.c.find(Locator::Css("#injected")).await.is_err());
    b.wait_text("attributes", hostile).await;
    assert!(b.body_text().await.contains(hostile));
    b.assert_nothing_injected().await;
    // The run ends; the page follows it to its end state.
    b.wait_text("status", "succeeded").await;
    // ... and in the finished run's page, rendered on the server.
    b.c.refresh().await.unwrap();
    b.wait_text("log", "<b id=injected>log markup</b>").await;
    assert!(b.c.find(Locator::Css("#injected")).await.is_err());
    b.assert_nothing_injected().await;
    // The overview counts the publish in its rate, and the run in the job's row.
    b.publish_rate(&s.url("/"), "projects/demo/topics/work")
        .await;
    b.wait_text("jobs", "100 %").await;
}

/// A long run cancelled with the run page's Cancel button ends cancelled,
/// and its live log showed the job's first line while it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_ui_cancels_the_run() {
    let Some((s, b)) = session(JOBS).await else {
        return;
    };
    s.publish("slow", "go", json!({})).await;
    let href = b
        .reload_until(&s.url("/ui/runs?job=slow"), "#runs a[href^='/ui/runs/']")
        .await;
    let id = href.rsplit('/').next().unwrap().to_string();
    b.c.goto(&s.url(&href)).await.unwrap();
    // Streamed while running: the run cannot end by itself for 10 minutes.
    b.wait_text("log", "slow-started").await;
    b.wait_text("status", "running").await;
    b.click("form[action$='/cancel'] button").await;
    b.wait_text("status", "cancelled").await;
    assert_eq!(s.run_status(&id).await, "cancelled", "{}", s.log());
    b.assert_nothing_injected().await;
}

/// An object named like markup is listed as text, downloads as an
/// attachment, and runs no script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_object_name_renders_as_text() {
    let Some((s, b)) = session(JOBS).await else {
        return;
    };
    let name = "<script>alert(1)</script>.txt";
    s.upload("files", name, "hello").await;
    b.c.goto(&s.url("/ui/buckets/files?flat=true"))
        .await
        .unwrap();
    b.wait_text("objects", name).await;
    b.assert_nothing_injected().await;
    // The folder view splits the name at its '/': still text.
    b.c.goto(&s.url("/ui/buckets/files")).await.unwrap();
    b.wait_text("objects", "<script>alert(1)</").await;
    b.assert_nothing_injected().await;
    // The link downloads the bytes as an attachment, never as a page.
    let href = b.href("#objects a.object, #objects tr.folder a").await;
    assert!(href.starts_with("/ui/buckets/files"), "{href}");
    let r = reqwest::get(s.url(&format!(
        "/ui/buckets/files/download?name={}",
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E.txt"
    )))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["content-type"], "application/octet-stream");
    assert!(h["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment;"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(r.text().await.unwrap(), "hello");
}

/// With a server token: a login form; a wrong token is refused; the right
/// one starts a session whose cookie is HttpOnly and SameSite=Strict and
/// is not the token; the cookie opens the dashboard but not the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_server_logs_in_with_a_session_cookie() {
    let Some(driver) = chromedriver() else { return };
    let token = "dashboard-test-token-7f3a";
    let s = start(JOBS, Some(token));
    let b = browser(&driver).await;
    b.c.goto(&s.url("/")).await.unwrap();
    let field = b.c.find(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys("not-the-token").await.unwrap();
    b.click("form.login button").await;
    b.wait_text("login-error", "Wrong token").await;
    assert!(
        b.c.get_named_cookie("pubrun_session").await.is_err(),
        "a wrong token must not start a session"
    );
    let field = b.c.find(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys(token).await.unwrap();
    b.click("form.login button").await;
    b.wait_for("header nav a.on[href='/']", "the overview after logging in")
        .await;
    let cookie = b.c.get_named_cookie("pubrun_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert!(cookie.same_site().is_some_and(|s| s.is_strict()));
    assert_ne!(cookie.value(), token);
    assert_eq!(cookie.value().len(), 64);
    // Pages open with the cookie ...
    b.c.goto(&s.url("/ui/jobs")).await.unwrap();
    b.wait_text("jobs", "hello").await;
    // ... the API does not.
    b.c.goto(&s.url("/api/v1/jobs")).await.unwrap();
    assert!(
        b.body_text()
            .await
            .contains("missing or wrong bearer token"),
        "the session cookie must not open the API"
    );
    // Logging out ends the session.
    b.c.goto(&s.url("/")).await.unwrap();
    b.click("form[action='/ui/logout'] button").await;
    b.wait_for("input[name=token]", "the login form after logging out")
        .await;
}

/// The job page's "Trigger" form, a run's "Run again" and the schedule
/// buttons each do what they say, through real form posts with the
/// session's CSRF field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_rerun_and_schedule_buttons_work() {
    let Some((s, b)) = session(JOBS).await else {
        return;
    };
    // Trigger now, with an attribute the job prints.
    b.c.goto(&s.url("/ui/jobs/hello")).await.unwrap();
    b.wait_text("definition", "hello-from-job").await;
    b.c.find(Locator::Css("#trigger textarea[name=data]"))
        .await
        .unwrap()
        .send_keys("by hand")
        .await
        .unwrap();
    b.c.find(Locator::Css("#trigger textarea[name=attributes]"))
        .await
        .unwrap()
        .send_keys("n=manual")
        .await
        .unwrap();
    b.click("#trigger button").await;
    b.wait_text("log", "hello-from-job-manual").await;
    b.wait_text("status", "succeeded").await;
    let first = b.c.current_url().await.unwrap().to_string();
    // Run again: a new run with the same message.
    b.click("form[action$='/rerun'] button").await;
    let deadline = Instant::now() + PATIENCE;
    while b.c.current_url().await.unwrap().as_str() == first {
        assert!(
            Instant::now() < deadline,
            "Run again did not open a new run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.wait_text("log", "hello-from-job-manual").await;
    // Schedules: pause, resume, run now.
    b.c.goto(&s.url("/ui/schedules")).await.unwrap();
    b.wait_text("schedules", "active").await;
    b.click("form[action='/ui/schedules/hourly/pause'] button")
        .await;
    b.wait_text("schedules", "paused").await;
    b.click("form[action='/ui/schedules/hourly/resume'] button")
        .await;
    b.wait_text("schedules", "active").await;
    b.submit("form[action='/ui/schedules/hourly/run-now'] button")
        .await;
    // A third run, the schedule's: newest first, it prints the schedule's attribute.
    b.reload_until(
        &s.url("/ui/runs?job=hello"),
        "#runs tr:nth-child(3) a[href^='/ui/runs/']",
    )
    .await;
    let newest = b.href("#runs tr:nth-child(1) a[href^='/ui/runs/']").await;
    b.c.goto(&s.url(&newest)).await.unwrap();
    b.wait_text("log", "hello-from-job-from-schedule").await;
    b.assert_nothing_injected().await;
}

/// Dashboard actions need the session's CSRF field and a same-site
/// origin: a forged form post is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_posts_are_refused() {
    let s = start(JOBS, None);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // A page view starts a session and carries its CSRF field.
    let page = http.get(s.url("/ui/schedules")).send().await.unwrap();
    let cookie = page.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a CSRF field in the page")
        .to_string();
    let post = |form: Vec<(&'static str, String)>, origin: Option<String>| {
        let mut r = http
            .post(s.url("/ui/schedules/hourly/pause"))
            .header("cookie", cookie.clone())
            .form(&form);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    // No CSRF field, a wrong one, another site's origin: refused.
    assert_eq!(post(vec![], None).await.unwrap().status(), 403);
    let wrong = vec![("csrf", "0".repeat(64))];
    assert_eq!(post(wrong, None).await.unwrap().status(), 403);
    let right = vec![("csrf", csrf.clone())];
    let r = post(right.clone(), Some("https://evil.example".into()))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // No session cookie at all: refused.
    let r = http
        .post(s.url("/ui/schedules/hourly/pause"))
        .form(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = get_json(s.url("/api/v1/schedules/hourly")).await;
    assert_eq!(
        v["schedule"]["paused"],
        json!(false),
        "a forged post paused it: {v}"
    );
    // The real form post works.
    let r = post(right, Some(s.url(""))).await.unwrap();
    assert_eq!(r.status(), 303);
    let v: serde_json::Value = get_json(s.url("/api/v1/schedules/hourly")).await;
    assert_eq!(v["schedule"]["paused"], json!(true), "{v}");
}

const POOL: &str = include_str!("manifests/dashboard-pool.toml");

impl Serve {
    /// Starts `pubrun agent NAME` in pool `pool`, with the pool's token.
    async fn agent(&self, pool: &str, name: &str) -> Proc {
        let t: serde_json::Value = get_json(self.url(&format!("/api/v1/pools/{pool}/token"))).await;
        Proc(
            Command::new(BIN)
                .args([
                    "agent",
                    "--server",
                    &self.url(""),
                    "--pool",
                    pool,
                    "--name",
                    name,
                ])
                .args(["--token", t["token"].as_str().unwrap()])
                .arg("--data-dir")
                .arg(self.path(&format!("agent-{name}")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

/// The pools page's Cordon button stops a machine getting work (a run
/// waits), Uncordon lets the waiting run start on it, Drain cordons it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_and_drain_from_the_pools_page() {
    let Some(driver) = chromedriver() else { return };
    let s = start(POOL, None);
    let _agent = s.agent("boxes", "box-1").await;
    let b = browser(&driver).await;
    let cordon = "form[action='/ui/machines/box-1/cordon'] button";
    b.reload_until(&s.url("/ui/pools"), "#machines a, #machines tr")
        .await;
    let deadline = Instant::now() + PATIENCE;
    while b.c.find(Locator::Css(cordon)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "box-1 never came up: {}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.c.goto(&s.url("/ui/pools")).await.unwrap();
    }
    b.wait_text("pools", "0.50").await;
    b.click(cordon).await;
    b.wait_text("machines", "cordoned").await;
    // Cordoned: a run for the pool waits.
    s.publish("remote", "go", json!({})).await;
    let href = b
        .reload_until(&s.url("/ui/runs?job=remote"), "#runs a[href^='/ui/runs/']")
        .await;
    let id = href.rsplit('/').next().unwrap().to_string();
    b.c.goto(&s.url(&href)).await.unwrap();
    b.wait_text("log", "waiting for a machine of pool boxes")
        .await;
    assert_eq!(s.run_status(&id).await, "starting", "{}", s.log());
    // Uncordon: the waiting run runs on box-1.
    b.c.goto(&s.url("/ui/pools")).await.unwrap();
    b.submit("form[action='/ui/machines/box-1/uncordon'] button")
        .await;
    b.c.goto(&s.url(&href)).await.unwrap();
    b.wait_text("log", "ran-on-box").await;
    b.wait_text("status", "succeeded").await;
    // Drain: no new work for it (an agent just stops getting runs).
    b.reload_until(
        &s.url("/ui/pools"),
        "form[action='/ui/machines/box-1/drain'] button",
    )
    .await;
    b.click("form[action='/ui/machines/box-1/drain'] button")
        .await;
    b.wait_text("machines", "cordoned").await;
}

// ------------------------------------------------------------ screenshots

const DEMO: &str = include_str!("manifests/dashboard-demo.toml");

/// Renews `docs/screenshots/*.png` when `PUBRUN_SCREENSHOTS` names the
/// directory; otherwise does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots() {
    let Some(dir) = std::env::var_os("PUBRUN_SCREENSHOTS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let driver = chromedriver().expect("chromedriver");
    let s = start(DEMO, None);
    // An agent joins the `laptops` pool, so the pools page has a machine.
    let _agent = s.agent("laptops", "laptop-anna").await;
    for n in ["cat.png", "dog.png", "fox.png"] {
        s.publish("uploads", "{\"width\": 128}", json!({ "name": n }))
            .await;
    }
    s.publish("imports", "", json!({ "source": "manual" }))
        .await;
    s.publish("reports", "{\"week\": 49}", json!({ "team": "data" }))
        .await;
    for (name, body) in [
        ("thumbs/1/cat.png", "png"),
        ("thumbs/2/dog.png", "png"),
        ("reports/2026-49.csv", "a,b"),
        ("README.txt", "hello"),
    ] {
        s.upload("output", name, body).await;
    }
    let b = browser(&driver).await;
    // Wait for the demo state: the import failed, the report runs on the agent.
    b.reload_until(
        &s.url("/ui/runs?status=failed"),
        "#runs a[href^='/ui/runs/']",
    )
    .await;
    let report = b
        .reload_until(
            &s.url("/ui/runs?job=report&status=running"),
            "#runs a[href^='/ui/runs/']",
        )
        .await;
    b.reload_until(
        &s.url("/ui/runs?job=thumbnail&status=succeeded"),
        "#runs tr:nth-child(3) a",
    )
    .await;
    let shots = [
        ("overview", "/".to_string()),
        ("runs", "/ui/runs".to_string()),
        ("run", report.clone()),
        ("job", "/ui/jobs/thumbnail".to_string()),
        ("schedules", "/ui/schedules".to_string()),
        ("bucket", "/ui/buckets/output".to_string()),
        ("pools", "/ui/pools".to_string()),
    ];
    b.publish_rate(&s.url("/"), "projects/demo/topics/uploads")
        .await;
    // Taller than the tests' window: a run's log is below its details.
    b.c.set_window_size(1280, 1200).await.unwrap();
    for (name, path) in shots {
        b.c.goto(&s.url(&path)).await.unwrap();
        if name == "run" {
            b.wait_text("log", "step 8 of 40").await;
        }
        let png = b.c.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}
