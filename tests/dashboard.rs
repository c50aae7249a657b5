//! The dashboard (contract §9) in a real browser: `sheepdog dashboard` and `sheepdog worker` run
//! as processes with env settings, headless Chromium is driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`) with fantoccini. Every wait is bounded.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::proxy::Proxy;
use common::{mock_latency as mock, small_lines as lines};
use common::{wait_for, TestEnv, WorkerProcess};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const TOKEN: &str = "dash-test-token-4f1c9a";

/// A `sheepdog dashboard` process on a port of its own; killed when dropped.
struct Dashboard {
    _child: tokio::process::Child,
    base: String,
}

impl Dashboard {
    async fn start(env: &TestEnv, db_url: &SecretString, token: Option<&str>) -> Dashboard {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sheepdog"));
        cmd.arg("dashboard")
            .env("DATABASE_URL", db_url.expose_secret())
            .env("AMQP_URL", env.amqp_url.expose_secret())
            .env("SHEEPDOG_DASHBOARD_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .env_remove("SHEEPDOG_DASHBOARD_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(t) = token {
            cmd.env("SHEEPDOG_DASHBOARD_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("dashboard process");
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), out.next_line())
            .await
            .expect("the dashboard says where it listens within 20 s")
            .unwrap()
            .expect("a line");
        let base = line
            .strip_prefix("dashboard on ")
            .expect("dashboard on http://…/")
            .trim_end_matches('/')
            .to_string();
        Dashboard { _child: child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// chromedriver on a free port and one headless Chromium session.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    _profile: std::path::PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = common::free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (apt-get install chromium chromium-driver)");
        let profile = std::env::temp_dir().join(format!("sheepdog-chromium-{}", uuid::Uuid::new_v4().simple()));
        let caps: serde_json::Map<String, Value> = json!({
            "goog:chromeOptions": {
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        })
        .as_object()
        .unwrap()
        .clone();
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = wait_for(Duration::from_secs(30), "chromedriver and a Chromium session", || {
            let caps = caps.clone();
            let webdriver = webdriver.clone();
            async move {
                ClientBuilder::new(HttpConnector::new())
                    .capabilities(caps)
                    .connect(&webdriver)
                    .await
                    .ok()
            }
        })
        .await;
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn close(self) {
        let _ = self.client.close().await;
        let _ = std::fs::remove_dir_all(&self._profile);
    }

    /// The value of `attr` of the first element matching `css`, if there is one now.
    async fn attr(&self, css: &str, attr: &str) -> Option<String> {
        self.client.find(Locator::Css(css)).await.ok()?.attr(attr).await.ok()?
    }

    async fn exists(&self, css: &str) -> bool {
        !self.client.find_all(Locator::Css(css)).await.unwrap().is_empty()
    }
}

/// How many jobs of the batch the open page shows as ended.
async fn ended(b: &Browser) -> Option<i64> {
    b.attr("#live span.ended", "data-value")
        .await
        .and_then(|v| v.parse::<i64>().ok())
}

async fn batch_status(env: &TestEnv, batch: &str) -> String {
    sheepdog::store::batches::show(&env.pool, batch)
        .await
        .unwrap()
        .map(|b| b.status)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_batchs_progress_moves_on_the_page_without_a_reload() {
    let env = TestEnv::new(mock(100, 200)).await;
    env.enqueue_lines("moving", &lines(300, "moving")).await;
    let dash = Dashboard::start(&env, &env.db_url, None).await;
    let browser = Browser::start().await;
    browser.client.goto(&dash.url("/batches/moving")).await.unwrap();
    let first = ended(&browser).await.expect("the batch page shows its progress");
    // Marks this page: a reload would lose the mark.
    browser
        .client
        .execute("window.__sheepdog_mark = 42; return 1;", vec![])
        .await
        .unwrap();
    let _worker = WorkerProcess::start(&env, &[("SHEEPDOG_CONCURRENCY", "4".to_string())]);
    let second = wait_for(Duration::from_secs(60), "the progress to move on the page", || async {
        ended(&browser).await.filter(|v| *v > first)
    })
    .await;
    let third = wait_for(Duration::from_secs(60), "the progress to move again", || async {
        ended(&browser).await.filter(|v| *v > second)
    })
    .await;
    let mark = browser
        .client
        .execute("return window.__sheepdog_mark || 0;", vec![])
        .await
        .unwrap();
    println!("progress on the page: {first} → {second} → {third} of 300, without a reload");
    // While it runs, the page shows what is left of it: its expected total and time to finish,
    // here set by the one replica's four calls in flight.
    assert!(browser.exists("#expected-total").await, "the expected total is shown");
    let eta = browser
        .client
        .find(Locator::Css("#estimate-eta"))
        .await
        .expect("the time to finish is shown")
        .text()
        .await
        .unwrap();
    assert!(eta.contains("workers: 1 replica(s), 4 calls in flight"), "{eta}");
    assert_eq!(mark, json!(42), "the page was not reloaded");
    assert!(third <= 300);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_batch_from_the_page_ends_it() {
    let env = TestEnv::new(mock(200, 400)).await;
    env.enqueue_lines("doomed", &lines(500, "doomed")).await;
    let _worker = WorkerProcess::start(&env, &[("SHEEPDOG_CONCURRENCY", "4".to_string())]);
    let dash = Dashboard::start(&env, &env.db_url, Some(TOKEN)).await;
    let browser = Browser::start().await;
    // Signed out: no action shown.
    browser.client.goto(&dash.url("/batches/doomed")).await.unwrap();
    assert!(!browser.exists("#actions").await);
    // Sign in with the token.
    browser.client.goto(&dash.url("/login")).await.unwrap();
    browser
        .client
        .find(Locator::Css("input[name=token]"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "signed in", || async {
        browser.exists("form[action='/logout']").await.then_some(())
    })
    .await;
    browser.client.goto(&dash.url("/batches/doomed")).await.unwrap();
    let source = browser.client.source().await.unwrap();
    assert!(!source.contains(TOKEN), "the token never appears in a page");
    browser
        .client
        .find(Locator::Id("action-cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let shown = wait_for(
        Duration::from_secs(30),
        "the page to show the batch cancelled",
        || async {
            browser
                .attr("h1 span.status", "data-status")
                .await
                .filter(|s| s == "cancelled")
        },
    )
    .await;
    assert_eq!(shown, "cancelled");
    let in_db = wait_for(
        Duration::from_secs(30),
        "the batch cancelled in the database",
        || async { Some(batch_status(&env, "doomed").await).filter(|s| s == "cancelled") },
    )
    .await;
    assert_eq!(in_db, "cancelled");
    let s = env.wait_batch("doomed", Duration::from_secs(30)).await;
    println!(
        "cancelled from the page: {} succeeded, {} cancelled of 500",
        s.succeeded, s.cancelled
    );
    assert!(s.cancelled > 0);
    assert_eq!(s.succeeded + s.cancelled + s.failed, 500);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_no_action_is_shown_and_a_forged_post_is_refused() {
    let env = TestEnv::new(mock(1, 2)).await;
    env.enqueue_lines("safe", &lines(20, "safe")).await;
    let dash = Dashboard::start(&env, &env.db_url, None).await;
    let browser = Browser::start().await;
    for path in ["/", "/batches", "/batches/safe", "/limits"] {
        browser.client.goto(&dash.url(path)).await.unwrap();
        assert!(browser.exists("#live").await, "{path} renders");
        assert!(!browser.exists("form[method=post]").await, "{path} shows no action");
        assert!(!browser.exists("a[href='/login']").await, "{path} offers no sign-in");
    }
    browser.close().await;
    let http = reqwest::Client::new();
    for (path, form) in [
        ("/batches/safe/cancel", vec![]),
        ("/batches/safe/pause", vec![("csrf", "forged")]),
        ("/batches/safe/priority", vec![("priority", "high")]),
        ("/dead/replay", vec![]),
        ("/login", vec![("token", "")]),
    ] {
        let r = http.post(dash.url(path)).form(&form).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "POST {path}");
    }
    let r = http.post(dash.url("/batches/safe/cancel")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "a POST without a body");
    // With a token set, a POST without a session or without the session's CSRF token is refused too.
    let guarded = Dashboard::start(&env, &env.db_url, Some(TOKEN)).await;
    let r = http
        .post(guarded.url("/batches/safe/cancel"))
        .form(&[("csrf", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "no session");
    let jar = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = jar
        .post(guarded.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    let cookie = r
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(!cookie.contains(TOKEN));
    let session = cookie.split(';').next().unwrap().to_string();
    let r = jar
        .post(guarded.url("/batches/safe/cancel"))
        .header("cookie", &session)
        .form(&[("csrf", "not-the-one")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "a session without its CSRF token");
    assert_ne!(batch_status(&env, "safe").await, "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_unreachable_the_page_says_so_and_recovers() {
    let env = TestEnv::new(mock(1, 2)).await;
    env.enqueue_lines("steady", &lines(10, "steady")).await;
    let pg = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let via = pg.carry(&env.db_url);
    let dash = Dashboard::start(&env, &via, None).await;
    let browser = Browser::start().await;
    browser.client.goto(&dash.url("/")).await.unwrap();
    assert!(browser.exists("#backlog").await, "the overview shows the backlog");
    // The database goes away: live connections cut, new ones refused.
    pg.set_down(true);
    pg.cut();
    let http = reqwest::Client::new();
    let t = std::time::Instant::now();
    let r = http.get(dash.url("/batches")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.text().await.unwrap().contains("database unreachable"));
    assert!(took < Duration::from_secs(6), "answered in {took:?}");
    // The open page says so by itself (its refresh swaps the message in).
    wait_for(
        Duration::from_secs(20),
        "the page to say the database is unreachable",
        || async { browser.exists("#live #error").await.then_some(()) },
    )
    .await;
    assert!(!browser.exists("#live #backlog").await);
    // Back: the page recovers by itself.
    pg.set_down(false);
    wait_for(Duration::from_secs(30), "the page to recover", || async {
        browser.exists("#live #backlog").await.then_some(())
    })
    .await;
    let r = http.get(dash.url("/batches")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A database that hangs (bytes held, nothing refused) is answered within the page's bound too.
    pg.set_stall(true);
    let t = std::time::Instant::now();
    let r = http.get(dash.url("/batches")).send().await.unwrap();
    let hung = t.elapsed();
    assert_eq!(r.status().as_u16(), 503);
    assert!(hung < Duration::from_secs(7), "answered in {hung:?}");
    pg.set_stall(false);
    wait_for(Duration::from_secs(30), "pages again after the stall", || async {
        let r = http.get(dash.url("/batches")).send().await.ok()?;
        (r.status().as_u16() == 200).then_some(())
    })
    .await;
    println!("database cut: 503 in {took:?}; hung: 503 in {hung:?}; the open page said so and recovered by itself");
    browser.close().await;
}
