package istio

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// ErrNotStarted: KubeSource.LookupPod before Run has its client.
var ErrNotStarted = errors.New("kubernetes source not started")

// kubeLookup is what LookupPod reads: this node's pod cache and a client
// for what the cache has not seen yet.
type kubeLookup struct {
	client   kubernetes.Interface
	local    cache.Store
	revision string
	defaults *atomic.Pointer[Defaults] // of the last Config built
}

// LookupPod returns this node's pod namespace/name with Istio's answer
// (ClassifyPod, against the mesh config of the last Config sent): from
// the informer's cache, or, when the cache has not seen the pod yet (a
// pod just created), a GET bounded by ctx. found is false when the API
// server has no such pod.
func (s *KubeSource) LookupPod(ctx context.Context, namespace, name string) (Pod, bool, error) {
	l := s.lookup.Load()
	if l == nil {
		return Pod{}, false, ErrNotStarted
	}
	d := DefaultDefaults()
	if p := l.defaults.Load(); p != nil {
		d = *p
	}
	if o, ok, err := l.local.GetByKey(namespace + "/" + name); err == nil && ok {
		if pod, ok := o.(*corev1.Pod); ok {
			return kubePod(pod, l.revision, d), true, nil
		}
	}
	pod, err := l.client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return Pod{}, false, nil
	case err != nil:
		return Pod{}, false, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	return kubePod(pod, l.revision, d), true, nil
}

// kubePod is a pod object as Config.Pods holds it.
func kubePod(pod *corev1.Pod, revision string, d Defaults) Pod {
	return Pod{
		Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID), NodeName: pod.Spec.NodeName,
		ServiceAccount: serviceAccount(pod), Labels: pod.Labels, Annotations: pod.Annotations,
		IPs: podIPs(pod), Mesh: ClassifyPod(pod, revision, d),
	}
}
