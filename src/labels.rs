//! Decoded labels for the coded fields of a call record, from the API spec.

use std::collections::BTreeMap;

use serde::Serialize;

/// A decoded code: the value as sent, a stable machine name and the label the
/// Uincall console shows. `name` and `label` are `None` for unknown codes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Label {
    pub code: serde_json::Value,
    pub name: Option<&'static str>,
    pub label: Option<String>,
}

fn label(code: impl Into<serde_json::Value>, found: Option<(&'static str, &str)>) -> Label {
    Label {
        code: code.into(),
        name: found.map(|(n, _)| n),
        label: found.map(|(_, l)| l.to_string()),
    }
}

/// Hang-up reason (`hangup_reason`, ver=1).
pub fn hangup_reason(code: i64) -> Label {
    let found = match code {
        1 => Some(("answered", "有座席已接听来电")),
        -1 => Some(("ringing_not_answered", "振铃未接听来电")),
        -2 => Some(("blacklisted", "黑名单导致来电挂断")),
        2 => Some(("queue_abandoned", "排队放弃")),
        3 => Some(("voicemail_left", "已留言")),
        4 => Some(("ivr", "IVR")),
        5 => Some(("outbound_failed", "外呼失败")),
        430 => Some(("vacant_number", "空号")),
        431 => Some(("powered_off", "关机")),
        432 => Some(("suspended", "停机")),
        433 => Some(("in_another_call", "正在通话")),
        434 => Some(("no_answer", "无人接听")),
        435 => Some(("wrong_number", "号码有误")),
        436 => Some(("number_expired", "号码过期")),
        437 => Some(("user_busy", "用户忙")),
        438 => Some(("service_paused", "暂停服务")),
        439 => Some(("call_waiting", "呼叫等待")),
        440 => Some(("call_reminder", "来电提醒")),
        441 => Some(("inconvenient", "不方便接听")),
        442 => Some(("do_not_disturb", "免打扰")),
        443 => Some(("local_number", "本地号码")),
        444 => Some(("non_local_number", "外地号码")),
        445 => Some(("forwarding_failed", "呼转不成功/多次呼转")),
        446 => Some(("line_busy", "线路忙")),
        447 => Some(("arrears", "欠费")),
        448 => Some(("network_busy", "网络忙")),
        449 => Some(("call_later", "稍后再拨")),
        450 => Some(("line_fault", "线路故障")),
        451 => Some(("inbound_restricted", "呼入限制")),
        452 => Some(("carrier_blacklist", "黑名单")),
        453 => Some(("call_frequency_exceeded", "呼叫超频")),
        454 => Some(("out_of_service_area", "不在服务区")),
        455 => Some(("call_restricted", "呼叫受限")),
        500 => Some(("data_misconfigured", "数据配置有误")),
        501 => Some(("communication_error", "通信异常")),
        502 => Some(("agent_not_answered", "坐席未接听")),
        503 => Some(("frequency_limited", "频次限制")),
        504 => Some(("anti_harassment_blocked", "防骚扰拦截")),
        505 => Some(("business_number_abnormal", "业务号码状态异常")),
        _ => None,
    };
    label(code, found)
}

/// Who hung up (`hangup_party`, ver=1).
pub fn hangup_party(code: i64) -> Label {
    let found = match code {
        1 => Some(("customer", "客户挂断")),
        2 => Some(("agent", "坐席挂断")),
        4 => Some(("system", "系统挂断")),
        _ => None,
    };
    label(code, found)
}

/// Call direction (`call_direction`): `call in` / `call out`.
pub fn call_direction(value: &str) -> Label {
    let found = match value.trim().to_ascii_lowercase().as_str() {
        "call in" | "callin" | "in" => Some(("inbound", "呼入")),
        "call out" | "callout" | "out" => Some(("outbound", "呼出")),
        _ => None,
    };
    label(value, found)
}

/// Application type of a call fragment (`app_type`).
pub fn app_type(value: &str) -> Label {
    let found = match value.trim() {
        "loginout" => Some(("agent_login_logout", "机呼入签入签出业务")),
        "callmemory" => Some(("outbound_call_memory", "外呼来电记忆业务")),
        "app" => Some(("ivr", "IVR业务")),
        "queue" => Some(("queue", "技能组业务")),
        "agent" => Some(("agent", "座席业务")),
        _ => None,
    };
    label(value, found)
}

/// Satisfaction score 1..4, labelled from `labels.satisfaction`.
pub fn satisfaction(code: i64, labels: &BTreeMap<String, String>) -> Label {
    let name = match code {
        1 => Some("level_1"),
        2 => Some("level_2"),
        3 => Some("level_3"),
        4 => Some("level_4"),
        _ => None,
    };
    Label {
        code: code.into(),
        name,
        label: name.and(labels.get(&code.to_string()).cloned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_hangup_reason_has_a_label() {
        let documented = [1, -1, -2, 2, 3, 4, 5]
            .into_iter()
            .chain(430..=455)
            .chain(500..=505);
        for code in documented {
            let l = hangup_reason(code);
            assert!(l.name.is_some() && l.label.is_some(), "code {code}");
        }
        assert_eq!(hangup_reason(430).label.as_deref(), Some("空号"));
        assert_eq!(hangup_reason(505).name, Some("business_number_abnormal"));
        assert_eq!(hangup_reason(999).name, None);
    }

    #[test]
    fn parties_directions_apps_and_satisfaction() {
        assert_eq!(hangup_party(4).name, Some("system"));
        assert_eq!(hangup_party(3).name, None);
        assert_eq!(call_direction("call out").name, Some("outbound"));
        assert_eq!(call_direction("call in").name, Some("inbound"));
        assert_eq!(call_direction("sideways").label, None);
        assert_eq!(app_type("app").name, Some("ivr"));
        let labels = BTreeMap::from([("2".to_string(), "满意".to_string())]);
        assert_eq!(satisfaction(2, &labels).label.as_deref(), Some("满意"));
        assert_eq!(satisfaction(7, &labels).name, None);
    }
}
