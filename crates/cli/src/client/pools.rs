//! `pubrun pools`, `pubrun machines`, `pubrun agents` and `pubrun cost`:
//! the machine pools of a server (REST under `/api/v1/pools`,
//! `/api/v1/machines`, `/api/v1/agents`, `/api/v1/cost`).

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use super::api::{Api, ServerError};
use super::args::ListByDefault;
use super::{names, output, ConnArgs};

// ---- arguments ----

/// `pubrun pools` lists; `pubrun pools token NAME` prints a pool's agent token.
pub type PoolsArgs = ListByDefault<PoolsCommand>;

#[derive(clap::Subcommand)]
pub enum PoolsCommand {
    /// List pools: provider, machines up / min / max, runs waiting, price (the default).
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Print the pool's agent token alone on a line, e.g.
    /// `PUBRUN_TOKEN=$(pubrun pools token laptops) pubrun agent --pool laptops …`.
    Token {
        /// Pool name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// `pubrun machines` lists; `machines cordon|uncordon|drain NAME` act on one.
pub type MachinesArgs = ListByDefault<MachinesCommand>;

#[derive(clap::Subcommand)]
pub enum MachinesCommand {
    /// List machines: pool, state, runs, cordoned, since when in that state (the default).
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Give the machine no new runs (its running runs go on).
    Cordon(MachineArgs),
    /// Let a cordoned machine take runs again.
    Uncordon(MachineArgs),
    /// Cordon the machine and stop it once its runs have ended (on-demand pools;
    /// an agent of an `agents` pool just gets no more work).
    Drain(MachineArgs),
}

// The one machine `cordon`, `uncordon` and `drain` act on (no doc comment:
// each subcommand's own text is its help).
#[derive(clap::Args)]
pub struct MachineArgs {
    /// Machine name.
    pub name: String,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `pubrun agents`: the agents connected now.
pub type AgentsArgs = ListByDefault<AgentsCommand>;

#[derive(clap::Subcommand)]
pub enum AgentsCommand {
    /// List connected agents: pool, slots, runs, last seen, labels (the default).
    #[command(visible_alias = "ls")]
    List(ConnArgs),
}

#[derive(clap::Args)]
#[command(
    after_help = "Machine time is a machine's up time; each instant is shared equally among \
the runs on the machine then, and instants without a run are the pool's idle time. Cost is machine \
time × the pool's price_per_hour (\"-\" when the pool has no price)."
)]
pub struct CostArgs {
    /// Only time after this: a duration back from now (30m, 24h, 7d, 1h30m) or an RFC 3339 time
    /// (2024-05-01T00:00:00Z, 2024-05-01T02:00:00+02:00, 2024-05-01). Default: all recorded time.
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<i64>,
    /// Also list the runs and the machine time each used.
    #[arg(long)]
    pub runs: bool,
    /// Also list each machine's up time, idle time and cost.
    #[arg(long)]
    pub machines: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

// ---- commands ----

pub async fn pools(args: PoolsArgs) -> Result<()> {
    match args.command {
        None => list_pools(&args.conn).await,
        Some(PoolsCommand::List(conn)) => list_pools(&conn).await,
        Some(PoolsCommand::Token { name, conn }) => token(&name, &conn).await,
    }
}

pub async fn machines(args: MachinesArgs) -> Result<()> {
    match args.command {
        None => list_machines(&args.conn).await,
        Some(MachinesCommand::List(conn)) => list_machines(&conn).await,
        Some(MachinesCommand::Cordon(m)) => machine_action(&m.name, "cordon", &m.conn).await,
        Some(MachinesCommand::Uncordon(m)) => machine_action(&m.name, "uncordon", &m.conn).await,
        Some(MachinesCommand::Drain(m)) => machine_action(&m.name, "drain", &m.conn).await,
    }
}

pub async fn agents(args: AgentsArgs) -> Result<()> {
    match args.command {
        None => list_agents(&args.conn).await,
        Some(AgentsCommand::List(conn)) => list_agents(&conn).await,
    }
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// The server's 404 for an unknown pool or machine, said plainly.
fn not_found(e: anyhow::Error, what: &str, name: &str, list: &str) -> anyhow::Error {
    match e.downcast_ref::<ServerError>() {
        Some(se) if se.code == "404" || se.code == "NOT_FOUND" => {
            anyhow!("no {what} named {name} on the server — `pubrun {list}` lists them")
        }
        _ => e,
    }
}

async fn list_pools(conn: &ConnArgs) -> Result<()> {
    output::get_list(
        conn,
        "/api/v1/pools",
        "pools",
        Some("no pools (declare [[pool]] tables in the manifest and `pubrun apply`)"),
        &["NAME", "PROVIDER", "UP", "MIN", "MAX", "WAITING", "PRICE/H"],
        pool_row,
    )
    .await
}

fn pool_row(p: &Value) -> Vec<String> {
    let kind = p
        .get("provider")
        .and_then(|v| v.get("kind"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    // Only on-demand pools are scaled by the server; the others have no min/max.
    let scaled = matches!(kind, "docker" | "gce");
    let limit = |key: &str| {
        if scaled {
            text(p, key)
        } else {
            "-".to_string()
        }
    };
    vec![
        text(p, "name"),
        kind.to_string(),
        text(p, "machines_up"),
        limit("min_machines"),
        limit("max_machines"),
        text(p, "runs_waiting"),
        price(num(p, "price_per_hour")),
    ]
}

fn price(p: Option<f64>) -> String {
    p.map_or_else(|| "-".into(), |p| format!("{p:.2}"))
}

fn money(c: Option<f64>) -> String {
    c.map_or_else(|| "-".into(), |c| format!("{c:.4}"))
}

async fn token(name: &str, conn: &ConnArgs) -> Result<()> {
    let resp = Api::new(conn)?
        .get(&format!("/api/v1/pools/{}/token", names::segment(name)))
        .await
        .map_err(|e| not_found(e, "pool", name, "pools"))?;
    if conn.json {
        return output::json(&resp);
    }
    let token = resp
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("server returned no token for pool {name}: {resp}"))?;
    output::out(&format!("{token}\n"))
}

async fn list_machines(conn: &ConnArgs) -> Result<()> {
    output::get_list(
        conn,
        "/api/v1/machines",
        "machines",
        Some("no machines (agents that join a pool and machines a pool starts show up here)"),
        &MACHINE_HEADERS,
        machine_row,
    )
    .await
}

const MACHINE_HEADERS: [&str; 8] = [
    "NAME", "POOL", "STATE", "RUNS", "SLOTS", "CORDONED", "SINCE", "ERROR",
];

fn machine_row(m: &Value) -> Vec<String> {
    let cordoned = m.get("cordoned").and_then(Value::as_bool).unwrap_or(false);
    let since = m
        .get("state_since_ms")
        .and_then(Value::as_i64)
        .map_or_else(|| "-".into(), |t| output::rfc3339_ms(t, false));
    vec![
        text(m, "name"),
        text(m, "pool"),
        text(m, "state"),
        text(m, "runs"),
        text(m, "slots"),
        if cordoned { "yes" } else { "no" }.to_string(),
        since,
        text(m, "last_error"),
    ]
}

async fn machine_action(name: &str, action: &str, conn: &ConnArgs) -> Result<()> {
    let api = Api::new(conn)?;
    let resp = api
        .post(
            &format!("/api/v1/machines/{}/{action}", names::segment(name)),
            &json!({}),
        )
        .await
        .map_err(|e| not_found(e, "machine", name, "machines"))?;
    if conn.json {
        return output::json(&resp);
    }
    let what = match action {
        "cordon" => "cordoned: it takes no new runs; its running runs go on",
        "uncordon" => "uncordoned: it takes runs again",
        _ => "draining: no new runs; stopped once its runs have ended",
    };
    eprintln!("machine {name} {what}");
    // The answer has no run count; the list has (best effort).
    let listed = match api.get("/api/v1/machines").await {
        Ok(all) => output::items(&all, "machines")
            .iter()
            .find(|m| m.get("name").and_then(Value::as_str) == Some(name))
            .cloned(),
        Err(_) => None,
    };
    let m = listed.unwrap_or_else(|| resp.get("machine").unwrap_or(&resp).clone());
    output::out(&output::table(&MACHINE_HEADERS, &[machine_row(&m)]))
}

async fn list_agents(conn: &ConnArgs) -> Result<()> {
    let now = now_ms();
    output::get_list(
        conn,
        "/api/v1/agents",
        "agents",
        Some("no agents connected (start one with `pubrun agent --server URL --pool POOL --token T`)"),
        &[
            "NAME",
            "POOL",
            "SLOTS",
            "RUNS",
            "LAST SEEN",
            "VERSION",
            "LABELS",
        ],
        |a| {
            let seen = a.get("last_seen_ms").and_then(Value::as_i64).map_or_else(
                || "-".into(),
                |t| format!("{} ago", output::duration_ms(now - t)),
            );
            vec![
                text(a, "name"),
                text(a, "pool"),
                text(a, "slots"),
                text(a, "runs"),
                seen,
                text(a, "version"),
                a.get("labels")
                    .map_or_else(|| "-".into(), output::map_pairs),
            ]
        },
    ).await
}

pub async fn cost(args: CostArgs) -> Result<()> {
    let conn = &args.conn;
    let since = args.since.unwrap_or(0);
    let since_q = since.to_string();
    let resp = Api::new(conn)?
        .call(
            reqwest::Method::GET,
            "/api/v1/cost",
            &[("since_ms", since_q.as_str())],
            None,
        )
        .await?;
    if conn.json {
        return output::json(&resp);
    }
    output::out(&render_cost(&resp, &args))
}

/// Seconds (fractional) for people.
fn secs(v: &Value, key: &str) -> String {
    num(v, key).map_or_else(
        || "-".into(),
        |s| output::duration_ms((s * 1000.0).round() as i64),
    )
}

fn render_cost(resp: &Value, args: &CostArgs) -> String {
    let mut s = String::new();
    let since = resp
        .get("since_ms")
        .and_then(Value::as_i64)
        .unwrap_or(args.since.unwrap_or(0));
    let until = resp.get("until_ms").and_then(Value::as_i64);
    let from = if since <= 0 {
        "the beginning".to_string()
    } else {
        output::rfc3339_ms(since, false)
    };
    let to = until.map_or_else(|| "now".into(), |t| output::rfc3339_ms(t, false));
    s.push_str(&format!("cost from {from} to {to}\n\n"));
    let pools = output::items(resp, "pools");
    s.push_str(&output::table_or(
        pools,
        "no machine time in this period",
        &[
            "POOL",
            "MACHINE TIME",
            "RUN TIME",
            "IDLE",
            "PRICE/H",
            "COST",
        ],
        |p| {
            vec![
                text(p, "pool"),
                secs(p, "machine_seconds"),
                secs(p, "run_seconds"),
                secs(p, "idle_seconds"),
                price(num(p, "price_per_hour")),
                money(num(p, "cost")),
            ]
        },
    ));
    s.push_str(&format!(
        "\ntotal cost: {}\n",
        money(num(resp, "total_cost"))
    ));
    if args.machines {
        let machines = output::items(resp, "machines");
        s.push('\n');
        s.push_str(&output::table_or(
            machines,
            "no machines were up in this period",
            &["MACHINE", "POOL", "UP", "IDLE", "COST"],
            |m| {
                vec![
                    text(m, "machine"),
                    text(m, "pool"),
                    secs(m, "seconds"),
                    secs(m, "idle_seconds"),
                    money(num(m, "cost")),
                ]
            },
        ));
    }
    if args.runs {
        let runs = output::items(resp, "runs");
        s.push('\n');
        s.push_str(&output::table_or(
            runs,
            "no runs on pool machines in this period",
            &["RUN", "JOB", "POOL", "MACHINES", "MACHINE TIME", "COST"],
            |r| {
                let machines = r
                    .get("machines")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(output::display).collect::<Vec<_>>().join(","))
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "-".into());
                vec![
                    text(r, "run_id"),
                    text(r, "job"),
                    text(r, "pool"),
                    machines,
                    secs(r, "machine_seconds"),
                    money(num(r, "cost")),
                ]
            },
        ));
    }
    s
}

// ---- --since ----

use super::output::now_ms;

/// `--since`: a duration back from now or an RFC 3339 time → milliseconds
/// since the epoch.
pub fn parse_since(s: &str) -> Result<i64, String> {
    parse_since_at(s, now_ms())
}

fn parse_since_at(s: &str, now: i64) -> Result<i64, String> {
    let t = s.trim();
    let at = if let Some(ms) = parse_duration_ms(t) {
        now - ms
    } else if let Some(ms) = parse_rfc3339_ms(t) {
        ms
    } else {
        return Err(format!(
            "`{s}` is neither a duration back from now (30m, 24h, 7d, 1h30m) nor an RFC 3339 time \
             (2024-05-01T00:00:00Z, 2024-05-01T02:00:00+02:00, 2024-05-01)"
        ));
    };
    if at > now {
        return Err(format!(
            "`{s}` is {} in the future; give a time in the past",
            output::duration_ms(at - now)
        ));
    }
    Ok(at.max(0))
}

/// A duration as the manifest spells it (`90s`, `30m`, `1h30m`, `7d`,
/// "30 minutes"): the same parser, humantime.
fn parse_duration_ms(s: &str) -> Option<i64> {
    let d = humantime::parse_duration(s).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// RFC 3339 (`2024-05-01T12:00:00Z`, offsets, a space for the `T`) or a bare
/// date taken as midnight UTC.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    let day = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(day.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_714_564_803_250; // 2024-05-01T12:00:03.250Z

    #[test]
    fn since_durations() {
        assert_eq!(parse_since_at("24h", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_since_at("30m", NOW), Ok(NOW - 1_800_000));
        assert_eq!(parse_since_at("1h30m", NOW), Ok(NOW - 5_400_000));
        assert_eq!(parse_since_at("7d", NOW), Ok(NOW - 7 * 86_400_000));
        assert_eq!(parse_since_at("90s", NOW), Ok(NOW - 90_000));
        assert_eq!(parse_since_at("0s", NOW), Ok(NOW));
        // What the manifest accepts, the flag accepts.
        assert_eq!(parse_since_at("30 minutes", NOW), Ok(NOW - 1_800_000));
        assert_eq!(parse_since_at("1d", NOW), Ok(NOW - 86_400_000));
        assert_eq!(
            parse_since_at("2 days 3h", NOW),
            Ok(NOW - 2 * 86_400_000 - 3 * 3_600_000)
        );
    }

    #[test]
    fn since_times() {
        assert_eq!(parse_since_at("2024-05-01T12:00:03.250Z", NOW), Ok(NOW));
        assert_eq!(parse_since_at("2024-05-01T12:00:03Z", NOW), Ok(NOW - 250));
        assert_eq!(
            parse_since_at("2024-05-01T14:00:03+02:00", NOW),
            Ok(NOW - 250)
        );
        assert_eq!(parse_since_at("2024-05-01T11:00:03.25-01:00", NOW), Ok(NOW));
        assert_eq!(parse_since_at("2024-05-01", NOW), Ok(NOW - 43_203_250));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00Z"),
            Some(951_782_400_000)
        );
    }

    #[test]
    fn since_errors() {
        for bad in [
            "garbage",
            "",
            "24",
            "h",
            "24x",
            "2024-13-01",
            "2024-02-30",
            "2024-05-01T25:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00+2",
            "-5m",
            "5m ago",
        ] {
            let e = parse_since_at(bad, NOW).unwrap_err();
            assert!(e.contains("neither a duration"), "{bad}: {e}");
        }
        let e = parse_since_at("2030-01-01T00:00:00Z", NOW).unwrap_err();
        assert!(e.contains("in the future"), "{e}");
    }

    #[test]
    fn pool_rows() {
        let agents = json!({"name": "laptops", "provider": {"kind": "agents"}, "min_machines": 0,
            "max_machines": 0, "machines_up": 2, "runs_waiting": 1, "price_per_hour": 3.6});
        assert_eq!(
            pool_row(&agents),
            ["laptops", "agents", "2", "-", "-", "1", "3.60"]
        );
        let docker = json!({"name": "big", "provider": {"kind": "docker", "image": "x"},
            "min_machines": 1, "max_machines": 3, "machines_up": 0, "runs_waiting": 0,
            "price_per_hour": null});
        assert_eq!(
            pool_row(&docker),
            ["big", "docker", "0", "1", "3", "0", "-"]
        );
    }
}
