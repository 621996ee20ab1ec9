from conftest import Server, event


def test_accepted_event_is_in_the_queue(server: Server) -> None:
    answer = server.post({"events": [event(id="trk_1")]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
    assert [e["id"] for e in server.stored()] == ["trk_1"]
