//! Manifest parsing, kind by kind, and the README examples.

mod parse {

    #[test]
    fn resource_kinds_are_the_tables_the_parser_takes() {
        let e = parse("m.toml", "[[no_such_kind]]\nname = \"x\"\n").unwrap_err();
        let mut named: Vec<&str> = e
            .message
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|k| *k != "project" && *k != "no_such_kind")
            .collect();
        named.sort_unstable();
        let mut kinds = RESOURCE_KINDS.to_vec();
        kinds.sort_unstable();
        assert_eq!(named, kinds, "{}", e.message);
    }

    use super::super::*;
    use crate::connection::{CredentialsSpec, GOOGLE_STORAGE_ENDPOINT};
    use crate::job::{ExecutorSpec, InputSpec, OutputSpec};

    const GOOD: &str = r#"
project = "demo"

[[topic]]
name = "uploads"
[[topic]]
name = "results"

[[job]]
name = "fit-model"
topic = "uploads"
process = { command = "python3", args = ["fit.py", "{{ attributes.objectId }}"] }
timeout = "30m"
retries = { max_attempts = 3, initial_backoff = "10s", max_backoff = "5m" }
concurrency = 4
result_topic = "results"
dedup_key = "{{ publish_time | date }}"
"#;

    #[test]
    fn parses_the_design_example() {
        let m = ok(GOOD);
        assert_eq!(m.topics.len(), 2);
        let j = &m.jobs[0];
        assert_eq!(j.topic, "projects/demo/topics/uploads");
        assert_eq!(j.result_topic, "projects/demo/topics/results");
        assert_eq!(j.timeout, Duration::from_secs(1800));
        assert_eq!(j.retries.max_attempts, 3);
        assert_eq!(j.concurrency, 4);
        assert!(
            matches!(&j.executor, ExecutorSpec::Process(p) if p.args[1] == "{{ attributes.objectId }}")
        );
    }

    fn err(src: &str) -> ManifestError {
        parse("pubrun.toml", src).unwrap_err()
    }

    fn ok(src: &str) -> Manifest {
        parse("pubrun.toml", src).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A topic and one process job on it; `extra` adds keys to the job,
    /// from line 7.
    fn one_job(process: &str, extra: &str) -> String {
        format!("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = {process}\n{extra}\n")
    }

    #[test]
    fn unknown_keys_point_at_their_line() {
        let e = err("project = \"demo\"\n[[topic]]\nname = \"abc\"\ncolour = \"red\"\n");
        assert_eq!((e.line, e.file.as_str()), (4, "pubrun.toml"));
        assert!(e.message.contains("colour"), "{e}");
        assert!(e.to_string().starts_with("pubrun.toml:4:"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"upload\"\nprocess = { command = \"true\" }\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("not declared"), "{e}");
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = { command = \"echo\", args = [\"{{ atributes.x }}\"] }\n");
        assert_eq!(e.line, 6);
        assert!(e.message.contains("atributes"), "{e}");
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = { command = \"x\" }\ntimeout = \"soon\"\n");
        assert_eq!(e.line, 7);
        let e = err("[[topic]]\nname = \"up\"\n");
        assert!(e.message.contains("between 3 and 255"), "{e}");
        let e =
            err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\n");
        assert!(e.message.contains("needs `process"), "{e}");
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\ndocker = { image = \"x\", memory = \"lots\" }\n");
        assert!(e.message.contains("memory"), "{e}");
    }

    #[test]
    fn job_filters_are_validated_with_the_error_position() {
        let job = |filter: &str| {
            format!("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = {{ command = \"true\" }}\nfilter = {filter}\n")
        };
        let m = ok(&job(r#"'attributes.eventType = "OBJECT_FINALIZE"'"#));
        assert_eq!(
            m.jobs[0].filter,
            r#"attributes.eventType = "OBJECT_FINALIZE""#
        );
        // `filter = '` is 10 characters, so position 15 of the filter is column 26.
        let e = err(&job("'attributes.x = '"));
        assert_eq!((e.line, e.column), (7, 26), "{e}");
        assert!(
            e.message.starts_with("invalid filter:") && e.message.contains("position 15"),
            "{e}"
        );
        let e = err(&job("'''attributes.x AND'''"));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("invalid filter"), "{e}");
    }

    #[test]
    fn buckets_with_notifications() {
        let m = ok("[[topic]]\nname = \"uploads\"\n[[bucket]]\nname = \"input\"\nnotifications = [{ topic = \"uploads\", event_types = [\"OBJECT_FINALIZE\"], object_name_prefix = \"csv/\" }]\n");
        assert_eq!(
            m.buckets[0].notifications[0].topic,
            "projects/demo/topics/uploads"
        );
        assert_eq!(m.buckets[0].notifications[0].payload_format, "JSON_API_V1");
        let e = err("[[topic]]\nname = \"uploads\"\n[[bucket]]\nname = \"input\"\nnotifications = [{ topic = \"uploads\", event_types = [\"OBJECT_MADE\"] }]\n");
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("OBJECT_MADE"), "{e}");
    }

    #[test]
    fn schedules_and_webhooks() {
        let m = ok("[[topic]]\nname = \"imports\"\n[[schedule]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\ntime_zone = \"Europe/Berlin\"\ntopic = \"imports\"\ndata = '{\"full\": true}'\n[[webhook]]\nname = \"start-import\"\ntopic = \"imports\"\nsecret_env = \"HOOK_SECRET\"\n");
        assert_eq!(m.schedules[0].topic, "projects/demo/topics/imports");
        assert_eq!(m.schedules[0].time_zone, "Europe/Berlin");
        assert_eq!(m.webhooks[0].secret_env.as_deref(), Some("HOOK_SECRET"));
        let e = err("[[topic]]\nname = \"imports\"\n[[schedule]]\nname = \"n\"\ncron = \"0 3 * * *\"\ntopic = \"imports\"\nwhen = 1\n");
        assert_eq!(e.line, 7, "{e}");
        let e = err("[[webhook]]\nname = \"w\"\ntopic = \"nope\"\n");
        assert!(e.message.contains("not declared"), "{e}");
    }

    #[test]
    fn schedule_missed_policy_is_checked_where_written() {
        use crate::trigger::{MissedPolicy, DEFAULT_MAX_BODY_BYTES};
        use std::time::Duration;
        let table = "[[topic]]\nname = \"ticks\"\n[[schedule]]\nname = \"n\"\ncron = \"0 3 * * *\"\ntopic = \"ticks\"\n";
        let m = ok(&format!(
            "{table}missed_max_age = \"2h\"\n[[webhook]]\nname = \"w\"\ntopic = \"ticks\"\n"
        ));
        assert_eq!(
            m.schedules[0].missed,
            MissedPolicy::RunOnce {
                max_age: Duration::from_secs(7200)
            }
        );
        assert_eq!(m.webhooks[0].max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let e = err(&format!("{table}missed = \"all\"\n"));
        assert_eq!((e.line, e.column), (7, 10), "{e}");
        assert!(
            e.message
                .starts_with("schedule \"n\": missed: \"all\" is not a policy"),
            "{e}"
        );
        let e = err(&format!(
            "{table}missed = \"skip\"\nmissed_max_age = \"soon\"\n"
        ));
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("missed_max_age: \"soon\""), "{e}");
        let e = err(&format!(
            "{table}missed = \"skip\"\nmissed_max_age = \"1h\"\n"
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(
            e.message.contains("only applies to missed = \"run_once\""),
            "{e}"
        );
    }

    #[test]
    fn job_pass_env_and_secrets() {
        let job = |extra: &str| one_job("{ command = \"env\", env = { MODE = \"x\" } }", extra);
        let m = ok(&job(
            "pass_env = [\"HTTP_PROXY\"]\nsecrets = { DB_PASSWORD = { env = \"PROD_DB_PASSWORD\" } }",
        ));
        let j = &m.jobs[0];
        assert_eq!(j.pass_env, vec!["HTTP_PROXY".to_string()]);
        assert_eq!(j.secrets["DB_PASSWORD"].env, "PROD_DB_PASSWORD");
        let e = parse("m.toml", &job("secrets = { MODE = { env = \"X\" } }")).unwrap_err();
        assert!(e.message.contains("both env and secrets"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = parse("m.toml", &job("pass_env = [\"PUBRUN_TOKEN\"]")).unwrap_err();
        assert!(e.message.contains("reserved"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = parse(
            "m.toml",
            &job("secrets = { A = { env = \"X\", value = \"s\" } }"),
        )
        .unwrap_err();
        assert!(e.message.contains("value"), "{e}");
    }

    #[test]
    fn connections_and_jobs_on_them() {
        let src = r#"
[[connection]]
name = "gcp"
project = "theirs"
credentials_file = "/etc/pubrun/sa.json"
pubsub_endpoint = "http://127.0.0.1:9000/"
[[job]]
name = "xjob"
connection = "gcp"
subscription = "projects/theirs/subscriptions/uploads"
result_topic = "projects/theirs/topics/results"
process = { command = "true" }
inputs = [{ from = "trigger", to = "in/" }]
outputs = [{ from = "out/", to = "gs://their-bucket/results/{{ run.id }}/" }]
"#;
        let m = ok(src);
        let c = &m.connections[0];
        assert_eq!(c.pubsub_endpoint, "http://127.0.0.1:9000");
        assert_eq!(c.storage_endpoint, GOOGLE_STORAGE_ENDPOINT);
        assert_eq!(
            c.credentials,
            CredentialsSpec::File {
                path: "/etc/pubrun/sa.json".into()
            }
        );
        let j = &m.jobs[0];
        assert_eq!(j.connection.as_ref(), Some(c));
        assert_eq!(j.subscription, "projects/theirs/subscriptions/uploads");
        assert_eq!(j.topic, "");
        assert_eq!(j.result_topic, "projects/theirs/topics/results");

        let e = err(&src.replace("connection = \"gcp\"", "connection = \"gpc\""));
        assert!(
            e.message.contains("connection \"gpc\" is not declared"),
            "{e}"
        );
        assert_eq!(e.line, 9);
        let e = err(&src.replace(
            "subscription = \"projects/theirs/subscriptions/uploads\"",
            "subscription = \"uploads\"",
        ));
        assert!(e.message.contains("full name"), "{e}");
        let e = err(&src.replace("name = \"xjob\"", "name = \"xjob\"\ntopic = \"t\""));
        assert!(e.message.contains("not a `topic`"), "{e}");
        let e = err(&src.replace("credentials_file", "token_env = \"T\"\ncredentials_file"));
        assert!(e.message.contains("one of credentials_file"), "{e}");
        let e = err(&src.replace("credentials_file", "credentials_fiel"));
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.line, 5);
        let e = err(&src.replace("http://127.0.0.1:9000/", "127.0.0.1:9000"));
        assert!(e.message.contains("pubsub_endpoint"), "{e}");
    }

    #[test]
    fn job_inputs_and_outputs() {
        let job = |extra: &str| one_job("{ command = \"true\" }", extra);
        let m = ok(&job("inputs = [{ from = \"trigger\", to = \"in/\" }, { from = \"gs://shared-bucket/some/prefix/\", to = \"shared/\" }]\noutputs = [{ from = \"out/\", to = \"gs://output/results/{{ run.id }}/\" }]"));
        let j = &m.jobs[0];
        assert_eq!(j.inputs.len(), 2);
        assert_eq!(
            j.inputs[0],
            InputSpec {
                from: "trigger".into(),
                to: "in/".into()
            }
        );
        assert_eq!(j.inputs[1].from, "gs://shared-bucket/some/prefix/");
        assert_eq!(
            j.outputs[0],
            OutputSpec {
                from: "out/".into(),
                to: "gs://output/results/{{ run.id }}/".into()
            }
        );
        // Without them: empty.
        assert!(ok(&job("")).jobs[0].inputs.is_empty());

        let e = err(&job("inputs = [{ from = \"trigger\", to = \"../in\" }]"));
        assert_eq!((e.line, e.column), (7, 36), "{e}");
        assert!(
            e.message.contains("inputs.to") && e.message.contains(".."),
            "{e}"
        );
        let e = err(&job("inputs = [{ from = \"trigger\", to = \"/abs\" }]"));
        assert!(e.message.contains("relative"), "{e}");
        let e = err(&job("inputs = [{ from = \"s3://x/y\", to = \"in\" }]"));
        assert_eq!((e.line, e.column), (7, 20), "{e}");
        assert!(e.message.contains("gs://"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"out/\", to = \"gs://Bad_Bucket!/x\" }]",
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("bucket name"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"out/\", to = \"gs://output/{{ runn.id }}/\" }]",
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("runn"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"a/../../b\", to = \"gs://output/x/\" }]",
        ));
        assert!(e.message.contains("outputs.from"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"out/\", to = \"gs://output/x/\", mode = 1 }]",
        ));
        assert!(e.message.contains("mode"), "{e}");
    }

    const POOLS: &str = r#"[[topic]]
name = "imports"

[[pool]]
name = "big"
provider = "docker"
docker_host = "unix:///var/run/docker.sock"
server_url = "http://host.docker.internal:8085"
min_machines = 0
max_machines = 2
runs_per_machine = 2
idle_timeout = "10m"
price_per_hour = 3.20
memory = "2GiB"
cpus = 2

[[pool]]
name = "gpu"
provider = "gce"
project = "my-project"
zone = "europe-west1-b"
machine_type = "n2-highmem-8"
source_image = "projects/cos-cloud/global/images/family/cos-stable"
server_url = "https://pubrun.example.com"
access_token_env = "GCE_TOKEN"

[[pool]]
name = "laptops"
provider = "agents"
token_env = "LAPTOP_TOKEN"
lease_timeout = "1m"

[[job]]
name = "es-import"
topic = "imports"
docker = { image = "importer:latest" }
pool = "big"

[[job]]
name = "quick"
topic = "imports"
process = { command = "true" }
"#;

    #[test]
    fn pools_parse_with_defaults() {
        use crate::pool::{ProviderSpec, LOCAL_POOL};
        let m = ok(POOLS);
        assert_eq!(m.pools.len(), 3);
        let big = &m.pools[0];
        assert_eq!(
            (big.min_machines, big.max_machines, big.runs_per_machine),
            (0, 2, 2)
        );
        assert_eq!(big.idle_timeout, Duration::from_secs(600));
        assert_eq!(big.lease_timeout, Duration::from_secs(30));
        assert_eq!(big.boot_timeout, Duration::from_secs(300));
        assert!(
            big.delete_when_idle,
            "docker machines are deleted by default"
        );
        assert_eq!(big.price_per_hour, Some(3.2));
        let ProviderSpec::Docker(d) = &big.provider else {
            panic!("{big:?}")
        };
        assert_eq!(d.image, "pubrun-agent:dev");
        assert_eq!(d.memory_bytes, Some(2 << 30));
        assert_eq!(d.cpus, Some(2.0));
        assert_eq!(d.server_url, "http://host.docker.internal:8085");

        let gpu = &m.pools[1];
        assert_eq!((gpu.min_machines, gpu.max_machines), (0, 1));
        assert!(!gpu.delete_when_idle, "gce machines are stopped by default");
        let ProviderSpec::Gce(g) = &gpu.provider else {
            panic!("{gpu:?}")
        };
        assert_eq!(g.api_base, "https://compute.googleapis.com/compute/v1/");
        assert_eq!(g.name_prefix, "pubrun");
        assert_eq!(g.access_token_env, "GCE_TOKEN");

        let laptops = &m.pools[2];
        assert_eq!(laptops.provider, ProviderSpec::Agents);
        assert_eq!(laptops.token_env, "LAPTOP_TOKEN");
        assert_eq!(laptops.lease_timeout, Duration::from_secs(60));

        assert_eq!(m.jobs[0].pool, "big");
        assert_eq!(m.jobs[1].pool, LOCAL_POOL);
        // "local" needs no declaration; declaring it with provider "local" is fine.
        let m = ok(&POOLS.replace("pool = \"big\"", "pool = \"local\""));
        assert_eq!(m.jobs[0].pool, "local");
        let m = ok("[[pool]]\nname = \"local\"\nprovider = \"local\"\nprice_per_hour = 0.5\n");
        assert_eq!(m.pools[0].provider, ProviderSpec::Local);
    }

    #[test]
    fn gce_name_prefix_is_stored_and_checked() {
        use crate::pool::ProviderSpec;
        let with = |prefix: &str| {
            POOLS.replace(
                "access_token_env = \"GCE_TOKEN\"\n",
                &format!("access_token_env = \"GCE_TOKEN\"\nname_prefix = {prefix}\n"),
            )
        };
        let m = ok(&with("\"acme-ci\""));
        let ProviderSpec::Gce(g) = &m.pools[1].provider else {
            panic!("{:?}", m.pools[1])
        };
        assert_eq!(g.name_prefix, "acme-ci");
        // Not a valid start of an instance name: pointed at on its line (26).
        let e = err(&with("\"Acme\""));
        assert_eq!((e.line, e.column), (26, 15), "{e}");
        assert!(e.message.contains("name_prefix \"Acme\""), "{e}");
        // PREFIX-gpu-NNNNNN must fit in 63 characters.
        let e = err(&with(&format!("\"{}\"", "p".repeat(53))));
        assert!(e.message.contains("63 characters"), "{e}");
        assert!(parse("pubrun.toml", &with(&format!("\"{}\"", "p".repeat(52)))).is_ok());
        // Only gce pools take it.
        let e = err(&pools_with(10, "name_prefix = \"x\""));
        assert!(
            e.message
                .contains("`name_prefix` does not apply to provider \"docker\""),
            "{e}"
        );
    }

    #[test]
    fn gce_pools_on_a_connection() {
        use crate::pool::ProviderSpec;
        let src = r#"
[[connection]]
name = "gcp"
project = "theirs"
credentials_file = "/etc/pubrun/sa.json"
compute_endpoint = "http://127.0.0.1:9"

[[pool]]
name = "gpu"
provider = "gce"
connection = "gcp"
server_url = "http://10.0.0.2:8085"
zone = "europe-west1-b"
machine_type = "g2-standard-4"
source_image = "projects/debian-cloud/global/images/family/debian-12"
service_account = "runner@theirs.iam.gserviceaccount.com"
subnetwork = "regions/europe-west1/subnetworks/batch"
external_ip = false
disk_type = "pd-ssd"
disk_size_gb = 200
accelerators = [{ type = "nvidia-l4", count = 2 }]
spot = true
"#;
        let m = ok(src);
        let ProviderSpec::Gce(g) = &m.pools[0].provider else {
            panic!("{:?}", m.pools[0])
        };
        assert_eq!(g.project, "theirs", "the connection's project");
        assert_eq!(g.api_base, "http://127.0.0.1:9/compute/v1/");
        assert_eq!(g.connection.as_ref().unwrap().name, "gcp");
        assert!(!g.external_ip && g.spot);
        assert_eq!((g.disk_type.as_str(), g.disk_size_gb), ("pd-ssd", 200));
        assert_eq!(g.accelerators[0].count, 2);
        let e = err(&src.replace(
            "connection = \"gcp\"\nserver",
            "connection = \"gpc\"\nserver",
        ));
        assert!(
            e.message.contains("connection \"gpc\" is not declared"),
            "{e}"
        );
        let e = err(&pools_with(10, "spot = true"));
        assert!(
            e.message
                .contains("`spot` does not apply to provider \"docker\""),
            "{e}"
        );
    }

    #[test]
    fn the_gce_example_manifest_is_valid() {
        use crate::pool::ProviderSpec;
        let m = ok(include_str!("../../../../examples/gce/pubrun.toml"));
        let ProviderSpec::Gce(g) = &m.pools[0].provider else {
            panic!("{:?}", m.pools[0])
        };
        assert!(g.spot && !g.external_ip && g.connection.is_some());
        assert_eq!(m.jobs[0].pool, "gpu");
        assert_eq!(m.jobs[0].connection.as_ref().unwrap().name, "gcp");
    }

    #[test]
    fn job_pool_must_be_declared() {
        let e = err(&POOLS.replace("pool = \"big\"", "pool = \"bigg\""));
        assert_eq!((e.line, e.column), (37, 8), "{e}");
        assert!(e.message.contains("\"bigg\" is not declared"), "{e}");
    }

    #[test]
    fn docker_socket_pools() {
        use crate::pool::{ProviderSpec, DEFAULT_MACHINE_DATA_DIR};
        let docker = |m: &Manifest| match &m.pools[0].provider {
            ProviderSpec::Docker(d) => d.clone(),
            other => panic!("{other:?}"),
        };
        // Off by default, and then no data dir.
        let d = docker(&ok(POOLS));
        assert!(!d.docker_socket);
        assert_eq!(d.machine_data_dir, "");
        // On: the default data dir, or the one given (trailing '/' dropped).
        let d = docker(&ok(&pools_with(13, "docker_socket = true")));
        assert!(d.docker_socket);
        assert_eq!(d.machine_data_dir, DEFAULT_MACHINE_DATA_DIR);
        let src = pools_with(
            13,
            "docker_socket = true\nmachine_data_dir = \"/srv/pubrun/\"",
        );
        assert_eq!(docker(&ok(&src)).machine_data_dir, "/srv/pubrun");
        // A relative or bind-breaking path, or a data dir without the socket.
        for bad in ["\"srv\"", "\"/a:b\""] {
            let e = err(&pools_with(
                13,
                &format!("docker_socket = true\nmachine_data_dir = {bad}"),
            ));
            assert_eq!(e.line, 14, "{e}");
            assert!(e.message.contains("absolute path"), "{e}");
        }
        let e = err(&pools_with(13, "machine_data_dir = \"/srv\""));
        assert!(e.message.contains("only used with docker_socket"), "{e}");
        // Docker keys only.
        let e = err(&POOLS.replace(
            "access_token_env = \"GCE_TOKEN\"\n",
            "access_token_env = \"GCE_TOKEN\"\ndocker_socket = true\n",
        ));
        assert!(
            e.message
                .contains("`docker_socket` does not apply to provider \"gce\""),
            "{e}"
        );
    }

    /// `src` with `line` (1-based) of POOLS replaced.
    fn pools_with(line: usize, text: &str) -> String {
        let mut lines: Vec<&str> = POOLS.lines().collect();
        lines[line - 1] = text;
        lines.join("\n")
    }

    #[test]
    fn bad_pools_point_at_the_key_or_value() {
        // Line 10 is `max_machines = 2` of the docker pool.
        #[rustfmt::skip]
        let cases: &[(usize, &str, (usize, usize), &str)] = &[
            (10, "project = \"p\"", (10, 1), "`project` does not apply to provider \"docker\""),
            (10, "max_machines = 0", (10, 16), "at least 1"),
            (9, "min_machines = 3", (10, 16), "above max_machines (2)"),
            (10, "colour = 1", (10, 1), "colour"),
            (10, "when_idle = \"sleep\"", (10, 13), "when_idle"),
            (11, "runs_per_machine = 0", (11, 20), "1 to 1000"),
            (12, "idle_timeout = \"soon\"", (12, 16), "idle_timeout"),
            (10, "lease_timeout = \"1s\"", (10, 17), "between 5s and 1h"),
            (13, "price_per_hour = -1.0", (13, 18), "≥ 0"),
            (10, "token_env = \"my token\"", (10, 13), "environment variable"),
            (14, "memory = \"lots\"", (14, 10), "not a size"),
            (15, "cpus = 0", (15, 8), "above 0"),
            (7, "docker_host = \"/var/run/docker.sock\"", (7, 15), "scheme"),
            (8, "# no server_url", (6, 12), "needs server_url"),
            (8, "server_url = \"host:8085\"", (8, 14), "http://"),
            (6, "provider = \"kubernetes\"", (6, 12), "one of"),
            (5, "name = \"gpu\"", (18, 8), "declared twice"),
            (5, "name = \"local\"", (6, 12), "can only be \"local\""),
            (5, "name = \"b~g\"", (5, 8), "container names"),
            (21, "# no zone", (19, 12), "needs zone"),
            (21, "image = \"x\"", (21, 1), "`image` does not apply to provider \"gce\""),
            (18, "name = \"GPU\"", (18, 8), "instance names"),
            (28, "name = \"l\"", (28, 8), "between 3 and 255"),
            (30, "runs_per_machine = 4", (30, 1), "--slots"),
            (30, "idle_timeout = \"1m\"", (30, 1), "does not apply to provider \"agents\""),
        ];
        for (line, text, at, msg) in cases {
            let e = err(&pools_with(*line, text));
            assert_eq!((e.line, e.column), *at, "{text}: {e}");
            assert!(e.message.contains(msg), "{text}: {e}");
        }
        // Above the default max (1): the error points at min_machines.
        let e = err(&pools_with(10, "min_machines = 3").replacen("min_machines = 0\n", "", 1));
        assert_eq!((e.line, e.column), (9, 16), "{e}");
        assert!(e.message.contains("max_machines (1, the default)"), "{e}");
        // Keys inside a provider-less pool: only price_per_hour.
        let e = err("[[pool]]\nname = \"local\"\nprovider = \"local\"\n  max_machines = 3\n");
        assert_eq!((e.line, e.column), (4, 3), "{e}");
        let e = err("[[pool]]\nname = \"cpu\"\nprovider = \"local\"\n");
        assert!(
            e.message.contains("belongs to the pool named \"local\""),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let e = err("project = \"demo\"\n[[topic]\nname = 1\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("100"), Some(100));
        assert_eq!(parse_bytes("lots"), None);
    }
}

mod readme {
    /// The manifest shown in README.md must stay valid.
    #[test]
    fn readme_manifest_parses() {
        let readme = include_str!("../../../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml block") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let m =
            super::super::parse("README.md", &readme[start..end]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.jobs.len(), 2);
    }

    /// So does the `[[pool]]` example of its Pools section.
    #[test]
    fn readme_pools_parse() {
        let readme = include_str!("../../../../README.md");
        let section = &readme[readme.find("## Pools").expect("README has a Pools section")..];
        let start = section.find("```\n").unwrap() + 4;
        let end = start + section[start..].find("```").unwrap();
        let m = super::super::parse("README.md", &section[start..end])
            .unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<&str> = m.pools.iter().map(|p| p.provider.kind()).collect();
        assert_eq!(kinds, ["docker", "gce", "agents"]);
    }
}
