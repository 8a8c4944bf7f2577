//! `corral canary WORKFLOW --prompt P --expect REGEX --max-latency 5s`: one
//! ask end to end (broker, worker, gateway, provider); exits 0 when the
//! answer matches in time, otherwise 1 with a one-line reason. Run hourly by
//! `corral-canary.timer`.

use std::path::Path;
use std::time::Duration;

use super::ask::ask;

/// Exit code of a failed canary.
pub const EXIT_FAILED: u8 = 1;

pub async fn run(socket: &Path, workflow: &str, prompt: &str, expect: &regex_lite::Regex, max_latency: Duration) -> u8 {
    let fail = |why: String| {
        eprintln!("canary {workflow}: FAIL: {why}");
        EXIT_FAILED
    };
    let (reply, elapsed) = match ask(socket, workflow, prompt, None).await {
        Ok(r) => r,
        Err(why) => return fail(why),
    };
    let ms = elapsed.as_millis();
    let Some(answer) = &reply.answer else {
        return fail(format!("no answer after {} model calls (request {})", reply.steps, reply.request_id));
    };
    if !expect.is_match(answer) {
        let shown: String = answer.chars().take(120).collect();
        return fail(format!("answer {shown:?} does not match /{}/ (request {})", expect.as_str(), reply.request_id));
    }
    if elapsed > max_latency {
        return fail(format!(
            "answered in {ms} ms, more than --max-latency {} ms (request {})",
            max_latency.as_millis(),
            reply.request_id
        ));
    }
    println!("canary {workflow}: ok in {ms} ms, {} tokens (request {})", reply.usage.total_tokens, reply.request_id);
    0
}
