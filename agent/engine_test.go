package agent

import (
	"context"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"k8s.io/client-go/tools/record"
)

// panickyView panics where a bug met on a bad object would.
type panickyView struct{ fakeView }

func (panickyView) Synced() (bool, string) { panic("a bad object") }

func TestSyncPanicIsAnErrorNotACrash(t *testing.T) {
	log := logrus.New()
	log.SetOutput(&strings.Builder{})
	e := New(panickyView{}, Clients{}, record.NewFakeRecorder(16), nil, Options{NodeName: thisNode, Log: log})
	requeue, err := e.syncSafely(context.Background())
	if err == nil || !strings.Contains(err.Error(), "a bad object") {
		t.Fatalf("syncSafely = %v, %v; want the panic as an error", requeue, err)
	}
}
