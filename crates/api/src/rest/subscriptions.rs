//! Handlers of `/v1/projects/P/subscriptions...`.

use super::*;

pub(super) const SUBSCRIPTION_VERBS: &str =
    "pull, acknowledge, modifyAckDeadline, modifyPushConfig, seek, detach";

#[allow(deprecated)] // PullRequest.return_immediately
pub(super) async fn subscription_resource(ps: PubSub, mut on: Resource, body: Body) -> Outcome {
    let (id, verb) = split_verb(&on.segment);
    let name = subscription_name(&on.project, id);
    let Some(verb) = verb else {
        parse_query(on.query.take(), &[])?;
        return match on.method {
            Method::PUT => {
                let s: SubscriptionJson = parse_body(body)?;
                Ok(subscription_json(
                    &ps.create_subscription(s.into_pb("", name)?).await?,
                ))
            }
            Method::GET => Ok(subscription_json(
                &ps.get_subscription(pb::GetSubscriptionRequest { subscription: name })?,
            )),
            Method::PATCH => {
                let (sub, update_mask) = parse_update::<SubscriptionJson>(body, "subscription")?;
                let r = pb::UpdateSubscriptionRequest {
                    subscription: Some(sub.into_pb("subscription.", name)?),
                    update_mask,
                };
                Ok(subscription_json(&ps.update_subscription(r).await?))
            }
            Method::DELETE => {
                let r = pb::DeleteSubscriptionRequest { subscription: name };
                deleted(ps.delete_subscription(r).await)
            }
            _ => Err(on.not_allowed(STANDARD_METHODS)),
        };
    };
    if !SUBSCRIPTION_VERBS.split(", ").any(|v| v == verb) {
        return Err(unknown_verb(
            &on.uri,
            "subscriptions",
            verb,
            SUBSCRIPTION_VERBS,
        ));
    }
    if on.method != Method::POST {
        return Err(on.not_allowed("POST"));
    }
    parse_query(on.query.take(), &[])?;
    match verb {
        "pull" => {
            let p: PullJson = parse_body(body)?;
            let r = pb::PullRequest {
                subscription: name,
                return_immediately: p.return_immediately.unwrap_or_default(),
                max_messages: int32("max_messages", &p.max_messages)?,
            };
            let got = ps.pull(r, None).await?;
            Ok(list_json(
                "receivedMessages",
                got.received_messages.iter().map(received_json).collect(),
                "",
            ))
        }
        "acknowledge" => {
            let a: AcknowledgeJson = parse_body(body)?;
            let r = ps
                .acknowledge(pb::AcknowledgeRequest {
                    subscription: name,
                    ack_ids: a.ack_ids,
                })
                .await?;
            ack_outcome(r)
        }
        "modifyAckDeadline" => {
            let m: ModifyAckDeadlineJson = parse_body(body)?;
            let r = ps.modify_ack_deadline(pb::ModifyAckDeadlineRequest {
                subscription: name,
                ack_ids: m.ack_ids,
                ack_deadline_seconds: int32("ack_deadline_seconds", &m.ack_deadline_seconds)?,
            })?;
            ack_outcome(r)
        }
        "modifyPushConfig" => {
            let m: ModifyPushConfigJson = parse_body(body)?;
            ps.modify_push_config(pb::ModifyPushConfigRequest {
                subscription: name,
                push_config: push_config_json("push_config", m.push_config)?,
            })
            .await?;
            Ok(empty())
        }
        "seek" => snapshots::seek(&ps, name, body).await,
        _ => Err(unimplemented("DetachSubscription")),
    }
}
